"""index messages by status: the sweeper looks up every unfinished answer

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_status", "messages", ["status"])


def downgrade() -> None:
    op.drop_index("ix_messages_status", table_name="messages")
