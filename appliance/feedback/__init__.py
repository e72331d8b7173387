"""The quality loop: which version served each response, and its receiver's rating of it."""
