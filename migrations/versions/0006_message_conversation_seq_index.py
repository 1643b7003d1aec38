"""index messages by conversation and order: starting a turn asks about a conversation's
last messages (tidechat.chat.turn_facts) without reading all of them

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_conversation_seq", "messages", ["conversation_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_messages_conversation_seq", table_name="messages")
