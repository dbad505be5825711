"""A LAMA-shaped data set and an exported LAMA prompt, both for tiny-gpt2 (its 20 city words are one token each)."""
import json
from pathlib import Path

CITIES = ("Paris London Berlin Rome Madrid Tokyo Vienna Moscow Prague Dublin Athens Lisbon Warsaw Cairo Delhi "
          "Chicago Boston Toronto Sydney Oslo").split()
# The subjects of make_lama(n_train=24) in their order: train Person0-23, dev Person24-31, test Person32-39.
PEOPLE = [f"Person{i}" for i in range(40)]


def make_lama(root: Path, relations: tuple[str, ...] = ("P19",), n_train: int = 96) -> Path:
    """A LAMA-shaped data dir at `root`: per relation n_train/8/8 facts (train/dev/test) `Person<i>` -> one of
    five cities (the i-th relation's answers shifted by i), a 20-word vocabulary, the template of P19."""
    (root / "29k").mkdir(parents=True)
    (root / "29k" / "vocab.json").write_text(json.dumps(sorted(CITIES)))
    (root / "relations.jsonl").write_text("".join(json.dumps({"relation": r, "template": "[X] was born in [Y] ."}) + "\n"
                                                  for r in relations))
    for shift, name in enumerate(relations):
        relation = root / "29k" / name
        relation.mkdir()
        facts = [{"sub_label": f"Person{i}", "obj_label": CITIES[(i + shift) % 5]} for i in range(n_train + 16)]
        for split, rows in (("train", facts[:n_train]), ("dev", facts[n_train:n_train + 8]), ("test", facts[n_train + 8:])):
            (relation / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lama_prompt(directory: Path, seed: int, **extra) -> Path:
    """An untrained LAMA prompt for tiny-gpt2 with its vocabulary, exported as the runner does."""
    import torch

    from components.method.model import PromptEncoder, export_prompt
    from components.method.templates import lama_template

    torch.manual_seed(seed)
    meta = {"benchmark": "lama", "task": "P19", "vocab": "29k", "causal": True, **extra}
    prompt_dir = export_prompt(PromptEncoder(6, 32, "mlp"), directory, lama_template([3, 3, 3], causal=True), "tiny-gpt2", meta)
    (prompt_dir / "vocab.json").write_text(json.dumps(CITIES))
    return prompt_dir
