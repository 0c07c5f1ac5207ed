"""Billing: pricing, invoices, Stripe meter reports, reconciliation, webhooks and the scheduler."""
