"""The k-means domains of a config's specialisation corpus against its topics or tasks: the
(domain, label-or-group) table the `cluster` construction's step 1 finds, recomputed exactly as
the build does (same corpus draw, same pass, same k-means seed). docs/SPECIALISATION.md quotes it.

    .venv/bin/python experiments/domains.py configs/bbc_topics.toml

New builds record the same table in their build.json (``domain_counts``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hfedmoe.construction.cluster import kmeans_domains
from hfedmoe.construction.prepare import _capture, _domains_against_known, _sample
from hfedmoe.data.datasets import load_holdout
from hfedmoe.data.tokenized import tokenize_for
from hfedmoe.foundation import config
from hfedmoe.foundation.seeding import CONSTRUCTION, rng_for
from hfedmoe.model import build_model, load_tokenizer, moe_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    cfg = config.load(parser.parse_args().config)
    spec = cfg.model.specialise
    rng = rng_for(spec.seed, CONSTRUCTION)
    corpus = _sample(load_holdout(cfg.data), spec.corpus_examples, rng)
    bare = cfg.model.model_copy(update={"construction": "upcycle", "lora": None})
    model = build_model(bare, cfg.data.task, corpus.label_names, seed=spec.seed).eval()
    data = tokenize_for(cfg, corpus, load_tokenizer(cfg.model))
    docs, _, _ = _capture(model, moe_blocks(model), data, spec.max_tokens, rng, lambda *a: None)
    domain = kmeans_domains(docs, cfg.model.num_experts, spec.seed)
    table = _domains_against_known(corpus, domain, cfg.model.num_experts)  # as build.json
    names = table["known_names"]
    print("| domain | " + " | ".join(names) + " | purity |")
    print("|" + "---|" * (len(names) + 2))
    for d, counts in enumerate(table["domain_counts"]):
        purity = max(counts) / max(sum(counts), 1)
        print(f"| {d} | " + " | ".join(map(str, counts)) + f" | {purity:.2f} |")


if __name__ == "__main__":
    main()
