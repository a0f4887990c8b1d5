"""outbound campaigns: campaigns, contacts, attempts, the do-not-call list; call metadata,
idempotency keys and answering-machine results; agent voicemail and disclosure settings

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-07 23:52:08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dnc_numbers",
        sa.Column("phone", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("call_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("phone"),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("from_number", sa.String(length=20), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("calling_window", sa.JSON(), nullable=False),
        sa.Column("max_concurrent_calls", sa.Integer(), nullable=False),
        sa.Column("calls_per_second", sa.Float(), nullable=False),
        sa.Column("retry_policy", sa.JSON(), nullable=False),
        sa.Column("start_at", sa.DateTime(), nullable=True),
        sa.Column("end_at", sa.DateTime(), nullable=True),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("next_dial_at", sa.DateTime(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_campaigns_agent_id"), ["agent_id"], unique=False)

    op.create_table(
        "campaign_contacts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("campaign_id", sa.String(length=40), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_outcome", sa.String(length=20), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("line", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign_id", "phone"),
    )
    with op.batch_alter_table("campaign_contacts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_campaign_contacts_due", ["campaign_id", "state", "next_attempt_at"], unique=False
        )
        batch_op.create_index("ix_campaign_contacts_phone_state", ["phone", "state"], unique=False)

    op.create_table(
        "campaign_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("campaign_id", sa.String(length=40), nullable=False),
        sa.Column("contact_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.String(length=40), nullable=True),
        sa.Column("twilio_call_sid", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["contact_id"], ["campaign_contacts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("contact_id", "number"),
    )
    with op.batch_alter_table("campaign_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_campaign_attempts_call_id"), ["call_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_campaign_attempts_campaign_id"), ["campaign_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_campaign_attempts_contact_id"), ["contact_id"], unique=False
        )

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("voicemail", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("disclosure", sa.Text(), nullable=True))

    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metadata", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("campaign_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("contact_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("answered_by", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_calls_campaign", ["campaign_id"], unique=False)
        batch_op.create_unique_constraint("uq_calls_idempotency_key", ["idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_constraint("uq_calls_idempotency_key", type_="unique")
        batch_op.drop_index("ix_calls_campaign")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("idempotency_key")
        batch_op.drop_column("answered_by")
        batch_op.drop_column("contact_id")
        batch_op.drop_column("campaign_id")
        batch_op.drop_column("metadata")

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("disclosure")
        batch_op.drop_column("voicemail")

    with op.batch_alter_table("campaign_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaign_attempts_contact_id"))
        batch_op.drop_index(batch_op.f("ix_campaign_attempts_campaign_id"))
        batch_op.drop_index(batch_op.f("ix_campaign_attempts_call_id"))

    op.drop_table("campaign_attempts")
    with op.batch_alter_table("campaign_contacts", schema=None) as batch_op:
        batch_op.drop_index("ix_campaign_contacts_phone_state")
        batch_op.drop_index("ix_campaign_contacts_due")

    op.drop_table("campaign_contacts")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaigns_agent_id"))

    op.drop_table("campaigns")
    op.drop_table("dnc_numbers")
