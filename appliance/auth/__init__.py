"""Authentication and authorization: API keys now; users, sessions and RBAC next."""
