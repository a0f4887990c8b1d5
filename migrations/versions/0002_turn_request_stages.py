"""turn stages: when the LLM and TTS requests were made

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 03:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("transcript_turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("llm_request_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("tts_request_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("transcript_turns", schema=None) as batch_op:
        batch_op.drop_column("tts_request_ms")
        batch_op.drop_column("llm_request_ms")
