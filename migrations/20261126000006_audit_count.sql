-- Refused admin calls beyond the audit's rate are recorded together: one row per method and
-- outcome per flush, with how many calls it stands for. Every other row stands for one call.
alter table admin_audit add column count integer not null default 1;
