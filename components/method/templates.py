"""Templates: where continuous prompt tokens, anchors, inputs and the target stand.

The language is plain text with three kinds of markers, in any order and number:

    [P]  or [P*3]     one (or three) continuous prompt tokens
    {field}           an input slot, filled from the example (e.g. {sub}, {premise})
    [Y]               the target slot: [MASK] tokens for a masked LM, the answer for a causal LM
    anything else     a discrete anchor, tokenised as written (e.g. "?" or "Question:")

LAMA's `(3, sub, 3, obj, 3)` is `[P*3] {sub} [P*3] [Y] [P*3]`; for a causal LM `[P*3] {sub} [P*3] [Y]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_MARKER = re.compile(r"\[P(?:\*(\d+))?\]|\{(\w+)\}|\[Y\]")


class TemplateError(ValueError):
    """A template that cannot be used: empty, no target slot, unknown slot, ..."""


@dataclass(frozen=True)
class Part:
    kind: str  # "prompt" | "slot" | "anchor" | "target"
    value: str = ""  # slot name or anchor text
    count: int = 1  # number of prompt tokens


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[Part, ...]

    @property
    def n_prompt_tokens(self) -> int:
        return sum(p.count for p in self.parts if p.kind == "prompt")

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(p.value for p in self.parts if p.kind == "slot")

    def without_prompts(self) -> "Template":
        """The same template with its continuous tokens removed (for manual prompts and fine-tuning)."""
        kept = " ".join(_render(p) for p in self.parts if p.kind != "prompt")
        return parse_template(kept)


def _render(part: Part) -> str:
    if part.kind == "prompt":
        return "[P]" if part.count == 1 else f"[P*{part.count}]"
    if part.kind == "slot":
        return "{" + part.value + "}"
    return "[Y]" if part.kind == "target" else part.value


def parse_template(text: str, fields: tuple[str, ...] | list[str] | None = None) -> Template:
    """Parse `text`; with `fields`, every `{slot}` must be one of them."""
    if not isinstance(text, str) or not text.strip():
        raise TemplateError("empty template: it needs at least a target slot [Y]")
    parts: list[Part] = []
    pos = 0
    for match in _MARKER.finditer(text):
        anchor = text[pos:match.start()].strip()
        if anchor:
            parts.append(Part("anchor", anchor))
        count, slot = match.group(1), match.group(2)
        if match.group(0) == "[Y]":
            parts.append(Part("target"))
        elif slot is not None:
            if fields is not None and slot not in fields:
                raise TemplateError(f"unknown slot {{{slot}}} in template {text!r}; known slots: {sorted(fields)}")
            parts.append(Part("slot", slot))
        else:
            n = int(count) if count else 1
            if n < 1:
                raise TemplateError(f"[P*{count}] in template {text!r}: the count must be at least 1")
            parts.append(Part("prompt", count=n))
        pos = match.end()
    tail = text[pos:].strip()
    if tail:
        parts.append(Part("anchor", tail))
    n_targets = sum(p.kind == "target" for p in parts)
    if n_targets != 1:
        raise TemplateError(f"template {text!r} has {n_targets} target slots [Y]; it needs exactly one")
    return Template(text, tuple(parts))


def lama_template(shape: list[int] | tuple[int, ...], causal: bool) -> str:
    """The paper's LAMA shapes: (3, sub, 3, obj, 3) for masked LMs, (3, sub, 3, obj) for causal LMs."""
    if causal:
        shape = tuple(shape[:2])
    texts = [f"[P*{n}]" for n in shape]
    pieces = [texts[0], "{sub}", texts[1] if len(texts) > 1 else "", "[Y]", texts[2] if len(texts) > 2 else ""]
    return " ".join(p for p in pieces if p and not p.startswith("[P*0]"))


def prompt_from_anchors(template: Template, tokenizer, causal: bool) -> tuple[str, list[int]]:
    """OptiPrompt's manual initialisation: `template` with each discrete anchor replaced by as many continuous
    tokens as it has pieces, and the ids of those pieces (the prompt starts as the manual prompt's words).
    A causal LM reads nothing after its target, so what follows [Y] is dropped."""
    parts, ids = [], []
    for i, part in enumerate(template.parts):
        if part.kind == "anchor":
            pieces = piece_ids(tokenizer, part.value, i == 0)
            parts.append(Part("prompt", count=len(pieces)))
            ids += pieces
        else:
            parts.append(part)
        if causal and part.kind == "target":
            break
    if not ids:
        raise TemplateError(f"template {template.text!r} has no words to initialise a prompt from")
    return " ".join(_render(p) for p in parts), ids


# --- from a template to model inputs -------------------------------------------------------------

@dataclass
class Encoded:
    """One model input. `prompt_index[i]` is k when position i holds continuous token k, else -1;
    `read_positions` are where the LM's output predicts each target token."""
    input_ids: list[int]
    prompt_index: list[int]
    target_positions: list[int]
    read_positions: list[int]


def piece_ids(tokenizer, text: str, first: bool = False) -> list[int]:
    """Token ids of `text` as it stands in a sequence. Byte-level BPE tokenises " word" and "word" differently:
    every piece but the first follows a space."""
    return tokenizer.encode(text if first else " " + text, add_special_tokens=False)


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    return next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)


def encode(
    template: Template,
    tokenizer,
    fields: dict[str, str],
    causal: bool,
    target_ids: list[int] | None = None,
    n_target_tokens: int = 1,
    max_length: int = 512,
    truncate: str | None = None,
) -> Encoded:
    """Tokenise `template` filled with `fields`.

    Masked LMs get [MASK] at the target slot and read their prediction there. Causal LMs get the
    target tokens themselves (teacher forcing) and read each from the position just before it:
    the output at position t predicts token t+1. `truncate` names the one slot (e.g. the passage)
    that is shortened from its end when the input is longer than `max_length`.
    """
    if target_ids is not None:
        n_target_tokens = len(target_ids)
    pieces: list[tuple[Part, list[int]]] = []
    for i, part in enumerate(template.parts):
        if part.kind == "slot":
            if part.value not in fields:
                raise TemplateError(f"template {template.text!r} needs field {part.value!r}, the example has {sorted(fields)}")
            pieces.append((part, piece_ids(tokenizer, str(fields[part.value]), i == 0)))
        elif part.kind == "anchor":
            pieces.append((part, piece_ids(tokenizer, part.value, i == 0)))
        elif part.kind == "prompt":
            pieces.append((part, [-1] * part.count))
        elif causal:
            pieces.append((part, list(target_ids) if target_ids is not None else [tokenizer.eos_token_id or 0] * n_target_tokens))
        else:
            pieces.append((part, [tokenizer.mask_token_id] * n_target_tokens))

    prefix = [] if causal or tokenizer.cls_token_id is None else [tokenizer.cls_token_id]
    suffix = [] if causal or tokenizer.sep_token_id is None else [tokenizer.sep_token_id]
    excess = len(prefix) + sum(len(ids) for _, ids in pieces) + len(suffix) - max_length
    if excess > 0:
        cut = next((ids for part, ids in pieces if part.kind == "slot" and part.value == truncate), None)
        if cut is None or len(cut) <= excess:
            raise TemplateError(
                f"input is {excess} tokens longer than max_length={max_length} and "
                + (f"slot {{{truncate}}} is too short to absorb it" if cut is not None else "no slot may be truncated"))
        del cut[len(cut) - excess:]

    input_ids, prompt_index, target_positions = list(prefix), [-1] * len(prefix), []
    next_prompt = 0
    for part, ids in pieces:
        if part.kind == "prompt":
            prompt_index += list(range(next_prompt, next_prompt + part.count))
            next_prompt += part.count
            input_ids += [pad_id(tokenizer)] * part.count  # placeholder, replaced by the prompt vector
            continue
        if part.kind == "target":
            target_positions = list(range(len(input_ids), len(input_ids) + len(ids)))
        input_ids += ids
        prompt_index += [-1] * len(ids)
    input_ids += suffix
    prompt_index += [-1] * len(suffix)
    read_positions = [p - 1 for p in target_positions] if causal else list(target_positions)
    if min(read_positions) < 0:
        raise TemplateError(f"template {template.text!r}: a causal LM needs at least one token before the target [Y]")
    return Encoded(input_ids, prompt_index, target_positions, read_positions)


def collate(batch: list[Encoded], pad_id: int):
    """Pad a list of `Encoded` to tensors; read positions are padded with -1 (multi-token targets)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    n_read = max(len(e.read_positions) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    prompt_index = torch.full((len(batch), width), -1, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    read_positions = torch.full((len(batch), n_read), -1, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        prompt_index[row, :n] = torch.tensor(e.prompt_index)
        attention_mask[row, :n] = 1
        read_positions[row, : len(e.read_positions)] = torch.tensor(e.read_positions)
    return {"input_ids": input_ids, "prompt_index": prompt_index, "attention_mask": attention_mask,
            "read_positions": read_positions}
