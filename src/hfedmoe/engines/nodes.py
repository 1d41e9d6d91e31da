"""How a node of the embedded engine answers a message, in this process or in a worker."""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents


def _cross_wire(content: RecordDict) -> RecordDict:
    """A deep copy through Flower's wire format: what a remote peer would receive."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    copy = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(copy, RecordDict)
    return copy


def call_client(client_app: ClientApp, msg: Message, context: Context, check_wire: bool) -> Message:
    """The ClientApp's reply to ``msg`` (``check_wire``: both cross Flower's wire format); an
    exception becomes an error reply, except :class:`Dropout` (the node vanished), raised."""
    received = msg
    if check_wire:
        received = Message(_cross_wire(msg.content), metadata=msg.metadata)
    try:
        reply = client_app(received, context)
        if reply.has_content() and check_wire:
            reply = Message(_cross_wire(reply.content), metadata=reply.metadata)
    except Exception as exc:  # a failing client must not take the server down (Dropout is not one)
        reply = Message(Error(code=500, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
    return reply
