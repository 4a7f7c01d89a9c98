"""NATS authorization for Chorus: one principal per agent name and per service, each with nkey
credentials and the least permissions its work needs, written as a nats-server config include.

`init_auth` (also `chorus auth init`) writes everything; `principals` says who gets what.
"""

from chorus.auth.config import AuthLayout, init_auth
from chorus.auth.permissions import Permissions
from chorus.auth.principals import Principal, principals

__all__ = ["AuthLayout", "Permissions", "Principal", "init_auth", "principals"]
