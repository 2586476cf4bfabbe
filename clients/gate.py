"""The ClientApp a campus runs: Flower's, but every message type it does not answer is refused and audited.

Flower's ClientApp fails a message of an unknown type (e.g. ``train.other``)
before any mod runs, so nothing would be logged; :class:`GuardedClientApp`
instead refuses it through the release guard (:func:`clients.guard.release_guard`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from .guard import release_guard
from .node import CampusRefusal, campus_setup

__all__ = ["HANDLED", "GuardedClientApp"]


HANDLED = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)
"""The message types a campus answers (each with its default action)."""


def _refuse_unknown(msg: Message, context: Context) -> Message:
    raise CampusRefusal(
        f"campus {campus_setup(context.node_config).name} refuses message type "
        f"{msg.metadata.message_type!r}: it answers only {', '.join(HANDLED)}"
    )


class GuardedClientApp(ClientApp):
    """Flower's ClientApp, but a message of a type the campus does not answer (e.g. ``train.other``) is refused
    through :func:`release_guard` and audited, instead of failing before any mod runs."""

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind in HANDLED or kind in (f"{t}.default" for t in HANDLED):
            return super().__call__(message, context)
        return release_guard(message, context, _refuse_unknown)
