"""Every table Meterline owns; importing this package registers them all on `Base.metadata`."""

from shared.models.base import Base
from shared.models.billing import (
    BillingRun,
    Invoice,
    InvoiceLine,
    ReconciliationMismatch,
    StripeMeterReport,
    StripeWebhookEvent,
)
from shared.models.identity import Account, Session, User, VerificationToken
from shared.models.keys import ApiKey, ApiKeyDeletion
from shared.models.ledger import LEDGER_TABLE, ReplayRun, UsageEventLedger
from shared.models.meters import (
    METER_PIECE_KEY,
    METER_WINDOW_KEY,
    Meter,
    MeterWindow,
    meter_piece_values,
    meter_pieces,
    meter_values,
)
from shared.models.operators import (
    AuditEntry,
    Operator,
    OperatorRole,
    OperatorSession,
    PipelineSample,
)
from shared.models.plans import (
    LIVE_STATUS_VALUES,
    BillingInterval,
    Plan,
    PlanVersion,
    Subscription,
    SubscriptionPhase,
    SubscriptionStatus,
)
from shared.models.tenancy import (
    MANAGER_ROLES,
    USAGE_READER_ROLES,
    Organization,
    OrganizationMember,
    Project,
    Role,
)
from shared.models.usage import (
    USAGE_RECORD_KEY,
    UsageCut,
    UsageCutTotal,
    UsageDaily,
    UsageMonthly,
    UsageRecord,
    UsageVersion,
)

__all__ = [
    "LEDGER_TABLE",
    "LIVE_STATUS_VALUES",
    "MANAGER_ROLES",
    "METER_PIECE_KEY",
    "METER_WINDOW_KEY",
    "USAGE_READER_ROLES",
    "USAGE_RECORD_KEY",
    "Account",
    "ApiKey",
    "ApiKeyDeletion",
    "AuditEntry",
    "Base",
    "BillingInterval",
    "BillingRun",
    "Invoice",
    "InvoiceLine",
    "Meter",
    "MeterWindow",
    "Operator",
    "OperatorRole",
    "OperatorSession",
    "Organization",
    "OrganizationMember",
    "PipelineSample",
    "Plan",
    "PlanVersion",
    "Project",
    "ReconciliationMismatch",
    "ReplayRun",
    "Role",
    "Session",
    "StripeMeterReport",
    "StripeWebhookEvent",
    "Subscription",
    "SubscriptionPhase",
    "SubscriptionStatus",
    "UsageCut",
    "UsageCutTotal",
    "UsageDaily",
    "UsageEventLedger",
    "UsageMonthly",
    "UsageRecord",
    "UsageVersion",
    "User",
    "VerificationToken",
    "meter_piece_values",
    "meter_pieces",
    "meter_values",
]
