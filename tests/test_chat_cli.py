"""`ortllm chat` driven through a pseudo-terminal: multi-turn, Ctrl-C stops an answer, slash commands."""

from __future__ import annotations

import os
import sys
import time

import pexpect
import pytest

from ortllm.sessions import SessionStore

PROMPT = ">>> "


@pytest.fixture
def chat(pulled):
    child = pexpect.spawn(
        sys.executable, ["-m", "ortllm.cli.main", "chat", "smollm2-135m", "--temperature", "0", "--max-tokens", "400"],
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"}, encoding="utf-8", timeout=60, dimensions=(40, 120),
    )  # fmt: skip
    child.expect("Type /help")
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_multi_turn_exchange_with_stats_and_ctrl_c(chat):
    chat.sendline("What is the capital of France?")
    chat.expect("Paris")
    chat.expect(r"tok/s")  # the status line: tokens, TTFT, tok/s
    chat.expect_exact(PROMPT)
    chat.sendline("/stats")
    chat.expect("TTFT")
    chat.expect_exact(PROMPT)
    chat.sendline("Write a very long story about a dragon who learns to code.")
    chat.expect("tokens")  # streaming has started
    chat.sendintr()  # Ctrl-C stops the answer, not the chat
    chat.expect("stopped")
    chat.expect_exact(PROMPT)
    chat.sendline("What did I ask you first?")
    chat.expect("tok/s")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    sessions = SessionStore().list()
    history = SessionStore().messages(sessions[0].id)
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users[0] == "What is the capital of France?" and users[-1] == "What did I ask you first?"
    # the stopped question was withdrawn (conversation.py's one rule), not stored with a part of an answer
    assert len(users) == 2 and "Paris" in history[1]["content"]
    assert not any("dragon" in u for u in users)


def test_slash_commands(chat):
    chat.sendline("/help")
    chat.expect("/reset")
    chat.expect_exact(PROMPT)
    chat.sendline("/system You answer in one word.")
    chat.expect("system prompt set")
    chat.expect_exact(PROMPT)
    chat.sendline("/save my-chat")
    chat.expect("saved as session my-chat")
    chat.expect_exact(PROMPT)
    chat.sendline("/load nothing-here")
    chat.expect("no session named")
    chat.expect_exact(PROMPT)
    chat.sendline("/frobnicate")
    chat.expect("unknown command")
    chat.expect_exact(PROMPT)
    chat.sendeof()  # Ctrl-D leaves
    chat.expect(pexpect.EOF)
    assert SessionStore().get("my-chat").system_prompt == "You answer in one word."


def test_ctrl_c_at_the_prompt_asks_for_a_second_press(chat):
    chat.sendintr()
    chat.expect_exact("press Ctrl-C again or /exit to quit")
    chat.expect_exact(PROMPT)
    chat.sendline("/help")  # still chatting: a press, then anything else, starts the count again
    chat.expect("/reset")
    chat.expect_exact(PROMPT)
    chat.sendintr()
    chat.expect_exact("press Ctrl-C again")
    chat.expect_exact(PROMPT)
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_twice_during_an_answer_keeps_the_chat(chat):
    chat.sendline("Write a very long story about a dragon who learns to code.")
    chat.expect("tokens")  # streaming has started
    chat.sendintr()
    time.sleep(0.2)  # two presses, not one coalesced signal
    chat.sendintr()  # pressed twice in a hurry: the answer stops, the chat goes on
    chat.expect("stopped")
    chat.expect_exact(PROMPT)
    chat.sendline("What is the capital of France?")
    chat.expect("Paris")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)


def test_a_chat_that_outgrows_its_context_offers_to_drop_the_oldest_turn(pulled):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ortllm.cli.main", "chat", "smollm2-135m", "--temperature", "0", "--max-tokens", "30", "--ctx", "100"],
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"}, encoding="utf-8", timeout=60, dimensions=(40, 120),
    )  # fmt: skip
    try:
        child.expect_exact(PROMPT)
        question = "Name one colour. " * 7
        child.sendline(question + "First.")
        child.expect("tok/s")
        child.expect_exact(PROMPT)
        child.sendline(question + "Second.")  # with the first turn before it, no longer fits 100 tokens
        child.expect(r"Prompt too long for context window \(100 tokens\)")
        child.expect("Drop the oldest turn and continue")
        child.sendline("y")
        child.expect("dropped the oldest turn")
        child.expect("tok/s")  # answered once room was made
        child.expect_exact(PROMPT)
        child.sendline("x" * 2000)
        child.expect("Drop the oldest turn and continue")
        child.sendline("n")  # declined: nothing is dropped or sent
        child.expect("not sent")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact(PROMPT)
        child.sendline("x" * 2000)  # the question alone is too long: a clear line, the chat goes on
        child.expect("shorten the question, or use a larger --ctx")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    first = next(s for s in SessionStore().list() if s.message_count)  # the conversation before /reset
    asked = [m["content"] for m in SessionStore().messages(first.id) if m["role"] == "user"]
    assert [q[-7:] for q in asked] == ["Second."]
