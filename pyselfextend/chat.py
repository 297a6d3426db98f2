"""A conversation in the terminal: ``pyselfextend chat`` with no message.

Documents given with ``--file`` go into the system message and are read once, before the first
question; each turn then evaluates only what is new (the cache keeps the conversation, see
``LocalModel.prefill``). Answers stream as they are generated; Ctrl-C stops an answer (or the
reading) and returns to the prompt, a second Ctrl-C at the prompt or end of input exits.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

from .model import LocalModel
from .progress import ProgressBar

HELP = """\
commands:
  /reset        forget the conversation (the documents stay read)
  /save FILE    save the conversation and its cache (resume it with /load or --prompt-cache)
  /load FILE    continue a conversation saved with /save
  /help         this text
  /quit         leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while an answer is written stops it."""


def system_message(system: Optional[str], documents: Sequence[Tuple[str, str]]) -> Optional[Dict[str, str]]:
    """The conversation's first message: ``system`` text followed by each (name, text) document,
    or None when there is neither."""
    parts = [system] if system else []
    if documents and not system:
        parts.append("Answer questions about the documents below.")
    parts += [f"Document {Path(name).name}:\n\n{text.strip()}" for name, text in documents]
    return {"role": "system", "content": "\n\n".join(parts)} if parts else None


class Conversation:
    """The messages so far and the model that holds them in its cache."""

    def __init__(self, llm: LocalModel, start: List[Dict[str, str]], *, chat_template: Optional[str],
                 generation: Dict[str, object], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.llm, self.start, self.chat_template = llm, list(start), chat_template
        self.generation = dict(generation)
        self.max_tokens = int(generation.get("max_tokens", 256))  # type: ignore[arg-type]
        self.messages = list(start)
        self.out, self.err = out, err

    def tokens(self, messages: List[Dict[str, str]], add_assistant: bool = True) -> List[int]:
        return self.llm.chat_tokens(messages, chat_template=self.chat_template, add_assistant=add_assistant)

    def read_documents(self) -> None:
        """Evaluates the opening messages now, so that the first question waits only for itself."""
        if not self.messages:
            return
        ids = self.tokens(self.messages, add_assistant=False)
        self.llm.check_fits(len(ids), self.max_tokens)
        room = self.llm.n_ctx - len(ids) - self.max_tokens
        started = time.monotonic()
        self.llm.prefill(ids, progress=ProgressBar("reading", stream=self.err))
        self.say(f"read {len(ids):,} tokens in {time.monotonic() - started:.1f} s; room left for the conversation: "
                 f"{room:,} tokens (n_ctx {self.llm.n_ctx:,})")

    def ask(self, question: str) -> None:
        """Streams the answer to ``question``; Ctrl-C stops it, keeping what was written."""
        messages = self.messages + [{"role": "user", "content": question}]
        ids = self.tokens(messages)
        try:
            self.llm.check_fits(len(ids), self.max_tokens)
        except ValueError as e:
            self.say(f"no room for this question: {e}; /reset to start over from the documents, or restart with a "
                     "larger --ctx")
            return
        reply = ""
        try:
            for piece in self.llm.generate(ids, stream=True, progress=ProgressBar("reading", stream=self.err),
                                           **self.generation):  # type: ignore[arg-type]
                reply += piece
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            self.say("stopped")
            if not reply:  # stopped while reading the question: as if it was not asked
                return
        self.out.write("\n")
        self.out.flush()
        self.messages = messages + [{"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.messages = list(self.start)
        self.say("conversation reset")

    def save(self, path: str) -> None:
        self.llm.save_state(path, metadata={"messages": self.messages})
        self.say(f"saved {len(self.llm.cached_tokens):,} tokens to {path}")

    def load(self, path: str) -> None:
        from .state import read_metadata

        messages = read_metadata(path).get("messages")  # before the cache is replaced
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{path} holds no conversation (it was not saved by chat's /save)")
        self.llm.load_state(path)
        self.messages = messages
        self.say(f"loaded {len(self.llm.cached_tokens):,} tokens and {len(messages)} messages from {path}")

    def say(self, text: str) -> None:
        self.err.write(f"[{text}]\n")
        self.err.flush()


def run_interactive(conversation: Conversation, read_line=input) -> int:
    """The prompt loop; returns the exit status."""
    conversation.say("type a question, /help for commands")
    interrupted = False
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            conversation.out.write("\n")
            return 0
        except KeyboardInterrupt:
            if interrupted:
                conversation.out.write("\n")
                return 0
            interrupted = True
            conversation.out.write("\n")
            conversation.say("Ctrl-C again, Ctrl-D or /quit to leave")
            continue
        interrupted = False
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            elif command == "/help":
                conversation.err.write(HELP + "\n")
            elif command == "/reset":
                conversation.reset()
            elif command in ("/save", "/load"):
                if not arg.strip():
                    conversation.say(f"usage: {command} FILE")
                else:
                    (conversation.save if command == "/save" else conversation.load)(arg.strip())
            elif command.startswith("/"):
                conversation.say(f"unknown command {command}; /help lists them")
            else:
                conversation.ask(line)
        except (ValueError, TypeError, OSError, RuntimeError) as e:  # bad input: say it, keep the conversation
            conversation.say(f"error: {e}")
