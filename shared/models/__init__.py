"""Every table Meterline owns; importing this package registers them all on `Base.metadata`."""

from shared.models.base import Base
from shared.models.identity import Account, Session, User, VerificationToken
from shared.models.keys import ApiKey
from shared.models.ledger import LEDGER_TABLE, ReplayRun, UsageEventLedger
from shared.models.plans import BillingInterval, Plan, Subscription, SubscriptionStatus
from shared.models.tenancy import MANAGER_ROLES, Organization, OrganizationMember, Project, Role
from shared.models.usage import USAGE_RECORD_KEY, UsageRecord

__all__ = [
    "LEDGER_TABLE",
    "MANAGER_ROLES",
    "USAGE_RECORD_KEY",
    "Account",
    "ApiKey",
    "Base",
    "BillingInterval",
    "Organization",
    "OrganizationMember",
    "Plan",
    "Project",
    "ReplayRun",
    "Role",
    "Session",
    "Subscription",
    "SubscriptionStatus",
    "UsageEventLedger",
    "UsageRecord",
    "User",
    "VerificationToken",
]
