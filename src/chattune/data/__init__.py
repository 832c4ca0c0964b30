"""The data pipeline: load -> select -> render to (ids, labels) -> batch or pack.

Pure functions over plain rows; see the modules for each step. ``load`` runs the step alone
(``chattune data``) and returns what it selected.
"""

from chattune.data.batching import MicroBatch, batch_plan, collate
from chattune.data.config import DataConfig
from chattune.data.render import (
    IGNORE_INDEX,
    PreparedData,
    answer_end_id,
    prepare,
    render_prompt_ids,
    resolve_template,
    stop_strings,
    tokenize_conversation,
    turn_token_ids,
)
from chattune.data.select import ConversationSet, load_conversations
from chattune.data.overview import DataSelection, load, select

__all__ = [
    "IGNORE_INDEX", "ConversationSet", "DataConfig", "DataSelection", "MicroBatch", "PreparedData", "answer_end_id", "batch_plan",
    "collate", "load_conversations", "prepare", "render_prompt_ids", "resolve_template", "stop_strings",
    "tokenize_conversation", "turn_token_ids", "load", "select",
]
