"""Chat turns over stored sessions: what to send the model and what to store afterwards.

Clients differ: some send their whole history every turn (OpenAI style), some send only the
new message plus a session id (the native `/api/chat` tip, the chat-completions `prompt`). One rule serves
both: the stored conversation is prepended unless the client's messages already start with it,
or carry assistant turns of their own (then the client's list is the truth and replaces it).
The system prompt is kept on the session, not among the messages.

A turn is planned without writing anything (a request refused before it runs leaves no trace),
started once it is accepted (the session and the user's new messages are stored, marked
unanswered, so a crash keeps the question), and ended by one rule, the same for the server and the
terminal chat (`ChatSession`): a completed answer is stored; a turn its caller stops or withdraws
(cancel, Ctrl-C, a client gone) is undone; one the server could not finish (shutdown, unload, a runtime
error, a crash) keeps its question, marked unanswered, for a retry.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .runtime.types import CANCELLED, ERROR, TokenEvent
from .sessions import SessionStore


@dataclass
class ChatTurn:
    session_id: str
    messages: list[dict[str, str]]  # what the model sees
    to_store: list[dict[str, str]] = field(default_factory=list)  # stored when the turn starts
    replace: bool = False  # the client's conversation replaces the stored one
    model: str | None = None
    system_prompt: str | None = None  # set on the session when the turn starts (None: unchanged)
    pending: list[int] | None = None  # ids of the stored, not yet answered messages (None: not started)
    created: bool = False  # starting the turn created the session


def plan_turn(
    sessions: SessionStore,
    *,
    model: str,
    messages: list[dict[str, str]],
    session_id: str | None = None,
    system_prompt: str | None = None,
) -> ChatTurn:
    """Resolve history for a new turn (read only: nothing is stored until `start_turn`)."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = system_prompt if system_prompt is not None else (systems[-1] if systems else None)
    session = sessions.find(session_id) if session_id else None
    convo = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    # questions of earlier turns that were never answered are not history: this turn supersedes them
    stored = sessions.messages(session.id, answered_only=True) if session else []
    if stored and convo[: len(stored)] == stored:
        full, new, replace = convo, convo[len(stored) :], False
    elif any(m["role"] == "assistant" for m in convo):
        full, new, replace = convo, convo, True
    else:
        full, new, replace = stored + convo, convo, False
    current = session.system_prompt if session else None
    effective = system if system is not None else current
    prefix = [{"role": "system", "content": effective}] if effective else []
    sid = session.id if session else (SessionStore.check_id(session_id) if session_id else str(uuid.uuid4()))
    changed = system if system is not None and (session is None or system != current) else None
    return ChatTurn(sid, prefix + full, new, replace, model, changed)


def start_turn(sessions: SessionStore, turn: ChatTurn) -> None:
    """Store the turn's new messages as unanswered (creating the session when it is new)."""
    turn.pending, turn.created = sessions.start_turn(
        turn.session_id,
        turn.to_store,
        replace=turn.replace,
        model=turn.model,
        system_prompt=turn.system_prompt,
    )


def commit_turn(sessions: SessionStore, turn: ChatTurn, reply: str) -> None:
    """Store the assistant's reply (starting the turn first when that has not happened yet)."""
    if turn.pending is None:
        start_turn(sessions, turn)
    sessions.finish_turn(turn.session_id, turn.pending or [], reply)


def abandon_turn(sessions: SessionStore, turn: ChatTurn, *, withdrawn: bool = False) -> None:
    """A turn that ends without a reply. The server could not answer (shutdown, unload, a runtime error):
    its questions stay stored, marked unanswered, for a retry. The client withdrew it (cancelled, went
    away): it is undone, and a session it created is removed again."""
    if turn.pending is None:
        return
    if withdrawn:
        sessions.withdraw_turn(turn.session_id, turn.pending, created=turn.created)
    else:
        sessions.finish_turn(turn.session_id, turn.pending, None)


class TurnStream(Protocol):
    """What a chat turn needs of the runtime's Stream (ortllm.runtime.job): its text and its hooks."""

    @property
    def text(self) -> str: ...

    def on_final(self, callback: Callable[[TokenEvent], None]) -> None: ...

    def on_close(self, callback: Callable[[], None]) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=TurnStream)


class ChatSession(Generic[S]):
    """A chat turn answered by `stream`: hooks on the stream end the turn by the module's one rule. The
    caller reads `stream` (iterate it, or `result()`); `cancel()` withdraws the turn from any thread."""

    def __init__(
        self,
        sessions: SessionStore | None,
        turn: ChatTurn,
        stream: S,
        client_gone: Callable[[], bool] | None = None,
    ) -> None:
        """`sessions` None: nothing is stored (a stateless chat); `client_gone`: the request's probe (the
        runtime cancels a stream whose client left: that is a withdrawal)."""
        self.sessions = sessions
        self.turn = turn
        self.stream = stream
        self.client_gone = client_gone
        self._withdrawn = False
        self._ended = sessions is None  # the turn's outcome is in the session store
        self._lock = threading.Lock()
        stream.on_final(self._final)
        stream.on_close(self._closed)

    @classmethod
    def begin(
        cls,
        sessions: SessionStore | None,
        turn: ChatTurn,
        stream: S,
        client_gone: Callable[[], bool] | None = None,
    ) -> ChatSession[S]:
        """Start `turn` now that the runtime accepted its `stream`: its question is stored, unanswered (a
        refused request leaves no trace, a crash keeps the question); the stream is closed if that fails."""
        if sessions is not None:
            try:
                start_turn(sessions, turn)
            except BaseException:
                stream.close()
                raise
        return cls(sessions, turn, stream, client_gone)

    @property
    def session_id(self) -> str:
        return self.turn.session_id

    def cancel(self, *, withdrawn: bool = True) -> None:
        """Stop the answer: the caller withdrew the turn, or (`withdrawn=False`) the server shuts down."""
        self._withdrawn = self._withdrawn or withdrawn
        self.stream.cancel()

    def _final(self, event: TokenEvent) -> None:
        reply = self.stream.text
        ok = event.finish_reason not in (ERROR, CANCELLED) and bool(reply)
        left = self.client_gone is not None and self.client_gone()
        self._end(reply if ok else None, withdrawn=self._withdrawn or left)

    def _closed(self) -> None:
        # closed before its final event: the reader stopped (a client gone, a failed send, Ctrl-C)
        self._end(None, withdrawn=True)

    def _end(self, reply: str | None, *, withdrawn: bool) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        assert self.sessions is not None
        if reply is not None:
            commit_turn(self.sessions, self.turn, reply)
        else:
            abandon_turn(self.sessions, self.turn, withdrawn=withdrawn)
