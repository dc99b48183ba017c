"""The JSON Schema of experiment files, generated from the configuration's annotations.

``python -m running.schema`` writes ``exp/schema.json``; ``--check`` only says whether the
shipped file is up to date (a test runs the same comparison). Editors that read JSON Schema
(VS Code, JetBrains, vim/neovim with a JSON language server) then complete keys, show each
key's default, range and allowed values, and flag typos while an experiment file is edited.

The schema covers what one key at a time can say: types, ranges, allowed names, no unknown
keys, and each method's own ``method_args``. What involves several keys or the disk (one
forget set, files that exist, classes of the checkpoint) is checked by ``main.py`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.io import atomic_write_text
from core.validation import adapter, model_of
from datasets import DATASETS
from running.config import ExperimentConfig
from unlearning import METHODS

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "exp" / "schema.json"

# what an editor shows when hovering a key (a test checks that every key has a line)
DOCS = {
    "Experiment": {
        "method": "unlearning method (main.py --help lists them; METHODS in methods.py)",
        "checkpoint": "base model: a .safetensors checkpoint with its .json sidecar, or the "
        "train.py recipe of one (trained once and cached in --checkpoints)",
        "class_to_forget": "class index, or list of class indices, to forget",
        "unlearning_rate": "fraction of the training pool to forget, drawn with the run's seed",
        "idxs_to_forget": "forget-index file: a JSON list of training-pool indices",
        "use_mask": "restrict updates to the SalUn saliency mask",
        "mask_thr": "fraction of the weights the saliency mask keeps",
        "load_mask": "a saved saliency mask (.safetensors) to use instead of computing one",
        "mask_augment": "augment the forget samples in the saliency pass (SalUn's loader does); "
        "default false: the mask depends only on the model and the forget set",
        "lr": "learning rate of the unlearning optimiser",
        "epochs": "unlearning epochs",
        "batch_size": "batch size of the unlearning run",
        "optimizer": "optimiser of the unlearning run",
        "method_args": "the method's own settings",
        "frozen": "parameter-name prefixes that stay unchanged (e.g. fc2, block1.0)",
        "replace_class": 'class replacement: {"old": trained class, "new": untrained class}',
        "pretrain_oracle": "retrain oracle of a self-supervised base model: exact (default: its "
        'encoder pretrained again without the forget set when pretrain.data is "pool") or '
        "shared (the base model's encoder reused: an approximation, flagged in metrics.json)",
        "representation": "measure forgetting in the penultimate features (metrics.json repr: "
        "linear probe, kNN, CKA to the oracle); default true, false for large models",
        "tag": "experiment name (a folder name); default: built from method and forget set",
        "tune": 'tune lr, epochs and method_args first (running/tune.py), e.g. {"trials": 20}: '
        "Optuna minimises Avg. Gap to the oracle on another forget set; the best settings go "
        "to tune/best_<experiment>.json and run next to the experiment (main.py --tune T)",
        "evaluate": 'verdicts over many models, e.g. {"models": 32} or {"models": 32, "ulira": '
        '{"shadows": 16}}: per-example epsilon and the NeurIPS 2023 score in '
        "runs/<experiment>/epsilon/ (main.py --eval-models N sets models for every experiment)",
    },
    "EvaluateConfig": {
        "models": "N: N retrain oracles (training seeds s..s+N-1) and N unlearned models "
        "(unlearning seeds s..s+N-1) on one forget set, scored per forget example as the "
        "NeurIPS 2023 unlearning competition does (epsilon.json: forgetting quality F and "
        "score); null: off",
        "ulira": "U-LiRA (Hayes et al. 2024): shadow models attack the N unlearned models; "
        "needs models; random or listed forget sets only (not class_to_forget)",
    },
    "TuneConfig": {
        "trials": "Optuna TPE trials (trial 0: the experiment's own settings)",
        "forget": "class-wise: the class (or classes) the trials forget, never an evaluated "
        "one; null: the next class after the evaluated ones (random and index forget sets are "
        "tuned on a second draw of the same size outside every evaluated forget set)",
        "seed": "seed of the sampler, of the trial runs and of the second random draw",
        "base_seeds": "recipe seeds of the base models the trials run on (objective: their "
        "mean Avg. Gap); null: the experiment's base model",
    },
    "UliraConfig": {
        "shadows": "K shadow base models, each trained on a random half of the pool and "
        "unlearned with the experiment's method (cost: K half-pool trainings and K runs)",
    },
    "OptimizerConfig": {
        "name": "optimiser",
        "momentum": "SGD momentum (Adam: beta1)",
        "weight_decay": "weight decay",
        "schedule": "learning-rate schedule over the unlearning epochs",
        "nesterov": "SGD with Nesterov momentum (default); false: plain momentum as SalUn",
    },
    "TrainConfig": {
        "model": "architecture; null: the dataset's default model",
        "dataset": "dataset name",
        "dataset_args": 'dataset options, e.g. {"split": "letters"} for emnist',
        "epochs": "training epochs",
        "lr": "peak learning rate",
        "batch_size": "training batch size",
        "momentum": "SGD momentum",
        "weight_decay": "weight decay",
        "schedule": "learning-rate schedule",
        "patience": "epochs without validation improvement before stopping; 0 = never",
        "augment": "random crops (and flips where they keep the meaning) while training",
        "seed": "training seed (initialisation, batch order, augmentation)",
        "split_seed": "seed of the validation split carved from the training pool",
        "val_fraction": "share of the training pool held out for validation",
        "classes": "train on these classes only (labels keep their dataset ids); null: all",
        "pretrain": "self-supervised pretraining of the encoder before supervised training "
        '(e.g. {"method": "byol", "epochs": 30}); null: supervised training only',
        "finetune": "after pretraining: full (train the whole model) or linear (only the "
        "classifier, on the frozen encoder)",
    },
    "PretrainConfig": {
        "method": "self-supervised method: byol (Grill et al. 2020, training/byol.py)",
        "data": "pool: the training part of the labelled pool without the forget set; "
        "unlabeled: the dataset's unlabeled split (stl10)",
        "epochs": "pretraining epochs (default 30)",
        "lr": "peak learning rate of the pretraining optimiser (default 0.002)",
        "optimizer": "adamw (default) or sgd (Nesterov momentum)",
        "momentum": "SGD momentum (sgd only)",
        "weight_decay": "weight decay (default 1e-4)",
        "schedule": "learning-rate schedule per step (default cosine)",
        "tau_base": 'EMA rate of the target network at the start ("tau" is accepted too); it '
        "rises to 1 along a cosine over all steps (default 0.99)",
        "projector": "projector MLP widths [hidden, out] (default [512, 128]; paper 4096, 256)",
        "predictor_hidden": "predictor MLP hidden width (default 512; paper 4096)",
        "batch_size": "pretraining batch size (default 256; each image gives two views)",
        "seed": "seed of the views, batch order and MLP heads; null: the recipe's seed",
        "crop_scale": "random-resized-crop area range [low, high]; null: [0.08, 1] for colour "
        "images, [0.6, 1] for grayscale digits",
        "knn_k": "neighbours of the kNN monitor (accuracy on validation, each epoch)",
        "knn_every": "epochs between kNN monitor evaluations; 0 turns the monitor off",
    },
}


def experiment_schema() -> dict[str, Any]:
    """The schema of an experiment file: one experiment object or a non-empty list of them."""
    one = adapter(ExperimentConfig).json_schema(ref_template="#/$defs/{model}")
    defs = one.pop("$defs", {})
    props = one["properties"]
    props["method"]["enum"] = sorted(METHODS)
    props["method_args"] = {
        "type": "object",
        "description": "the method's own settings (see the method's docstring)",
    }
    cases: list[dict[str, Any]] = []
    for name in sorted(METHODS):
        args = model_of(METHODS[name].args).model_json_schema(ref_template="#/$defs/{model}")
        args.pop("title", None)
        cases.append(
            {
                "if": {"properties": {"method": {"const": name}}},
                "then": {"properties": {"method_args": args}},
            }
        )
    default = ExperimentConfig.__dataclass_fields__["method"].default
    cases.append(  # no `method` key: the default method's arguments
        {
            "if": {"not": {"required": ["method"]}},
            "then": {
                "properties": {
                    "method_args": model_of(METHODS[str(default)].args).model_json_schema()
                }
            },
        }
    )
    one["allOf"] = cases
    one["title"] = "Experiment"
    defs["Experiment"] = one
    defs["TrainConfig"]["properties"]["dataset"]["enum"] = sorted(DATASETS)
    index = {"type": "integer", "minimum": 0}
    props["replace_class"]["anyOf"][0] = {  # the Rule behind dict[str, int]: these two keys
        "type": "object",
        "properties": {"old": index, "new": index},
        "required": ["old", "new"],
        "additionalProperties": False,
    }
    for name, docs in DOCS.items():
        for key, text in docs.items():
            defs[name]["properties"][key]["description"] = text
    pre = defs["PretrainConfig"]["properties"]  # the paper's name, accepted as well
    pre["tau"] = pre["tau_base"] | {"description": "the same as tau_base (the BYOL paper's tau)"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "generated by `python -m running.schema` from running/config.py; do not edit",
        "title": "Experiment file of main.py -L",
        "oneOf": [
            {"$ref": "#/$defs/Experiment"},
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Experiment"}},
        ],
        "$defs": defs,
    }


def schema_text() -> str:
    return json.dumps(experiment_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if exp/schema.json is outdated")
    args = p.parse_args(argv)
    text = schema_text()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.is_file() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is outdated: run python -m running.schema", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(SCHEMA_PATH, text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
