"""security: document ingest status, one content hash per agent, tool budgets

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10 10:00:00

Rows that exist are whole documents (`ready`). Duplicate uploads stored before the unique
index are reduced to the oldest copy; the chunks of the removed copies are swept from the
knowledge base at the next start (`knowledge.service.DocumentIngest.recover`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=20), server_default="ready", nullable=False)
        )
    op.execute(
        "DELETE FROM documents WHERE id NOT IN ("
        " SELECT id FROM ("
        "  SELECT id, ROW_NUMBER() OVER ("
        "   PARTITION BY agent_id, sha256 ORDER BY created_at, id) AS copy"
        "  FROM documents) AS numbered"
        " WHERE copy = 1)"
    )
    op.create_index("uq_documents_agent_sha256", "documents", ["agent_id", "sha256"], unique=True)
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tool_limits", sa.JSON(), server_default="{}", nullable=False))
    with op.batch_alter_table("tool_invocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("destination", sa.String(length=20), nullable=True))
        batch_op.create_index(
            "ix_tool_invocations_destination", ["destination", "started_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tool_invocations", schema=None) as batch_op:
        batch_op.drop_index("ix_tool_invocations_destination")
        batch_op.drop_column("destination")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("tool_limits")
    op.drop_index("uq_documents_agent_sha256", table_name="documents")
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("status")
