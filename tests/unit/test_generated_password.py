"""`appliance users create --generate-password`: what it generates passes the password policy and is not repeated."""

from __future__ import annotations

from appliance.auth.passwords import check_password
from appliance.cli.users import GENERATED_LENGTH, generate_password


def test_generated_passwords_pass_the_policy_and_differ() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        check_password(password, "admin")
        assert len(password) == GENERATED_LENGTH and password.isascii() and password.isalnum()
