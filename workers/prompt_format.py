"""How the policy sees a prompt: the text it continues and the tokens that text encodes to.

One place for both the policy worker and the submit-time check (`workers/intake.py`), so a
problem is measured in exactly the tokens the served policy will encode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lodestar.workers.messages import ExtendRequest, Prompt

if TYPE_CHECKING:  # the submit-time check imports this module in the CLI: keep it light
    from transformers import PreTrainedTokenizerBase


class PolicyPrompts:
    """Renders prompts (as a chat, assistant turn opened, when the tokenizer has a template)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.chat = tokenizer.chat_template is not None

    def render(self, prompt: Prompt) -> str:
        if not self.chat:
            return prompt if isinstance(prompt, str) else "\n".join(m.content for m in prompt)
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [{"role": m.role, "content": m.content} for m in prompt]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def prefix(self, request: ExtendRequest) -> str:
        """The text a policy continues: the rendered prompt, the steps so far, then the partial
        step (every engine builds its tokens from this, so all see the same ids)."""
        return self.render(request.prompt) + "".join(request.steps) + request.partial_step

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Prefix token ids; a rendered chat carries its own special tokens, plain text gets the
        tokenizer's usual ones (BOS for most)."""
        enc = self.tokenizer(texts, add_special_tokens=not self.chat)
        return [list(ids) for ids in enc["input_ids"]]

    def count(self, prompt: Prompt) -> int:
        """Tokens the policy encodes for `prompt` before its first step."""
        return len(self.tokenize([self.render(prompt)])[0])
