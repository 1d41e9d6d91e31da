"""The two things the embedded engine does that only a SuperLink does in Flower, in one place.

Flower 1.41 has no public way for them, because outside a SuperLink nothing should do them:

* **Message ids.** A SuperLink gives every message it stores an id (``Metadata.message_id``, a
  read-only property over the private ``_message_id``), and a reply names the request's id in
  ``reply_to_message_id``. The embedded engine stores and delivers messages itself, so it
  assigns the ids, here and nowhere else.
* **The task identity.** Every ``Message`` Flower builds is stamped with the task it belongs
  to, read from the process-wide ``flwr.supercore.task_identity.TaskIdentity`` that a
  SuperLink's or SuperNode's process sets. The embedded engine's process (and each of its
  worker processes) sets it to the run's, as the SuperLink would.

A Flower upgrade that renames either breaks this module's tests (tests/test_engine.py runs
every engine path), not code scattered over the engine.
"""

from __future__ import annotations

import uuid

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def assign_message_id(msg: Message, message_id: str | None = None) -> str:
    """Give ``msg`` the id a SuperLink would when storing it (a fresh one unless given)."""
    message_id = message_id or uuid.uuid4().hex
    msg.metadata.__dict__["_message_id"] = message_id
    return message_id


def act_as_superlink(run_id: int) -> None:
    """Stamp this process's messages with the run's task, as a SuperLink's process does."""
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
