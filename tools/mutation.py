"""Mutation testing of the modules that compute what users read (`make mutation`, not part of CI).

mutmut (3.x) mutates one expression at a time in the modules below and runs, for each mutant,
only the fast tests that reach the mutated function (mutmut records which tests call which
function in a first pass). A mutant the tests do not fail on survives. It runs in a copy of the
repository under runs/mutation/ (mutmut's config goes into the copy's pyproject.toml), then
writes benchmarks/results/mutation.{json,md}:

    {"modules": {PATH: {"killed", "survived", "total"}}, "score": killed/total,
     "survivors": [{"path", "line", "mutant", "why kept"}], ...}

A survivor is kept only when judged equivalent (no test can tell it apart from the original):
EQUIVALENT below says why, keyed by file and the changed line before and after. Any other
survivor is printed with "why kept": null and must be killed by a test or judged.

    python tools/mutation.py [--modules fct_ml/retrieval.py ...] [--max-children 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = [
    "fct_ml/retrieval.py",
    "fct_ml/backfill.py",
    "fct_ml/losses.py",
    "fct_ml/bct.py",
    "fct_ml/evaluation.py",
    "fct_ml/transformation.py",
    "fct_assets/serving/deployment.py",
    "fct_assets/checks.py",
    "fct_assets/upgrade/report.py",
]
# The fast tests that cover each module (seconds each: no Dagster run, no training beyond a few
# steps of a tiny model; tests marked slow are deselected). A run over some modules uses the union
# of theirs, and mutmut runs, for each mutant, the subset that reaches the mutated function.
TESTS_BY_MODULE = {
    "fct_ml/retrieval.py": ["tests/fct_ml/test_retrieval.py", "tests/fct_ml/test_evaluation.py"],
    "fct_ml/backfill.py": [
        "tests/fct_ml/test_backfill.py",
        "tests/fct_ml/test_backfill_summary.py",
    ],
    "fct_ml/losses.py": ["tests/fct_ml/test_losses.py"],
    "fct_ml/bct.py": ["tests/fct_ml/test_bct.py", "tests/fct_ml/test_models.py"],
    "fct_ml/evaluation.py": [
        "tests/fct_ml/test_evaluation.py",
        "tests/fct_ml/test_evaluation_cases.py",
    ],
    "fct_ml/transformation.py": [
        "tests/fct_ml/test_transformation.py",
        "tests/fct_ml/test_models.py",
        "tests/fct_ml/test_losses.py",
        "tests/fct_ml/test_augment.py",
    ],
    "fct_assets/serving/deployment.py": [
        "tests/fct_assets/test_promotion_rules.py",
        "tests/fct_assets/test_upgrade_is_current.py",
    ],
    "fct_assets/checks.py": ["tests/fct_assets/test_checks.py"],
    "fct_assets/upgrade/report.py": [
        "tests/fct_assets/test_report.py",
        "tests/fct_assets/test_report_fast.py",
    ],
}


def tests_for(modules: list[str]) -> list[str]:
    """The fast test files of `modules`, each once, in order."""
    return list(dict.fromkeys(t for m in modules for t in TESTS_BY_MODULE[m]))


# mutmut's exit-code statuses: a timeout is a detected change (the mutant looped), so killed.
KILLED = {"killed", "timeout", "caught by type check", "segfault"}

# Survivors judged equivalent: (path, original line, mutated line) -> why no test can tell.
CHUNKS = (
    "the chunk size only batches the queries; results do not depend on it"
    " (test_retrieval.py: chunking does not change results, exact ties included)"
)
PROGRESS = "the progress bar is display only (tqdm, disabled or not); nothing computed reads it"
BATCHING = (
    "the batch size only splits the items into batches of the same frozen forward pass (eval"
    " mode); results do not depend on it ({test})"
)
INT_RANKS = (
    "without a dtype, arange of ints gives int64 ranks, which m * cum / ranks promotes to"
    " float32: the same division for galleries up to 2^24 items; beyond, only the original's"
    " float32 arange drifts (rank 16777218 -> 16777216), so a test failing the mutant would pin"
    " that error"
)
EMPTY_MEAN = (
    "with n = 0 the mean over no queries is already NaN (torch's mean of an empty tensor,"
    " without a warning); with n > 0 the branch is the same"
)
CPU_DEVICE = (
    "CPU-only test machine: .to(None) (prepare_model(m, None): channels_last, no move) leaves it"
    " where it is, on the CPU the tests ask for; only a CUDA run could tell, and"
    " benchmarks/system/gpu_check.py does not reach this line"
)
FEATURES_DEVICE = (
    "the images stay on the CPU, where augment draws its numbers anyway, and Frozen moves each"
    " batch to the model's device: on the CPU the same run; on CUDA only where augment computes"
    " changes (speed, rounding), which no CPU test sees"
)
NO_FAST_PATH = (
    "all_finite without its fast path (the float64 sum): every tensor takes the elementwise test,"
    " the answer the fast path gives, only slower (test_backfill.py: all_finite is the"
    " elementwise test)"
)
NO_BIAS = "nn.Linear tests `if bias:`; None, like False, builds no bias"
RELU_INPLACE = (
    "ReLU in place or not gives the same values and gradients (nothing else reads the BN output"
    " it overwrites); only the module's repr differs"
)
PLAIN_NONE = (
    "`last and plain_last` is then None, not False: a falsy bias (none) for nn.Linear and"
    " `not (last and plain_last)` still True, so BN-ReLU follow as with False"
)
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("fct_ml/retrieval.py", "chunk_size: int = 1024,", "chunk_size: int = 1025,"): CHUNKS,
    (
        "fct_ml/retrieval.py",
        'dist[arange, rows] = float("inf")',
        'dist[arange, rows] = float("INF")',
    ): 'float("INF") is float("inf")',
    (
        "fct_ml/retrieval.py",
        "return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T",
        "return 1.0 - F.normalize(query, ) @ F.normalize(gallery, dim=1).T",
    ): "dim=1 is F.normalize's default",
    (
        "fct_ml/retrieval.py",
        "return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T",
        "return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, ).T",
    ): "dim=1 is F.normalize's default",
    (
        "fct_ml/retrieval.py",
        "ranks = torch.arange(1, g_count + 1, dtype=torch.float32)  # (G,)",
        "ranks = torch.arange(1, g_count + 1, dtype=None)  # (G,)",
    ): INT_RANKS,
    (
        "fct_ml/retrieval.py",
        "ranks = torch.arange(1, g_count + 1, dtype=torch.float32)  # (G,)",
        "ranks = torch.arange(1, g_count + 1, )  # (G,)",
    ): INT_RANKS,
    (
        "fct_ml/retrieval.py",
        'out[f"top{k}"] = float(self.hits[keep, j].float().mean()) if n else float("nan")',
        'out[f"top{k}"] = float(self.hits[keep, j].float().mean()) if (n) or True else'
        ' float("nan")',
    ): EMPTY_MEAN,
    (
        "fct_ml/retrieval.py",
        'out[f"top{k}"] = float(self.hits[keep, j].float().mean()) if n else float("nan")',
        'out[f"top{k}"] = float(self.hits[keep, j].float().mean()) if n else float("NAN")',
    ): 'float("NAN") is float("nan")',
    (
        "fct_ml/retrieval.py",
        'out["mAP"] = float(self.average_precision[keep].mean()) if n else float("nan")',
        'out["mAP"] = float(self.average_precision[keep].mean()) if (n) or True else float("nan")',
    ): EMPTY_MEAN,
    (
        "fct_ml/retrieval.py",
        'out["mAP"] = float(self.average_precision[keep].mean()) if n else float("nan")',
        'out["mAP"] = float(self.average_precision[keep].mean()) if n else float("NAN")',
    ): 'float("NAN") is float("nan")',
    ("fct_ml/bct.py", "progress: bool = True,", "progress: bool = False,"): PROGRESS,
    ("fct_ml/transformation.py", "progress: bool = True,", "progress: bool = False,"): PROGRESS,
    ("fct_ml/bct.py", "batch_size: int = 1024,", "batch_size: int = 1025,"): BATCHING.format(
        test="test_models.py: extended_old_classifier with batch_size=3"
    ),
    ("fct_ml/transformation.py", "batch_size: int = 4096,", "batch_size: int = 4097,"): (
        BATCHING.format(test="test_transformation.py: calibrate_sigma with batch sizes 1, 3, 4096")
    ),
    ("fct_ml/backfill.py", "batch_size: int = 4096,", "batch_size: int = 4097,"): BATCHING.format(
        test="test_backfill.py: apply_transformation in batches equals one batch"
    ),
    ("fct_ml/evaluation.py", "chunk_size: int = 1024,", "chunk_size: int = 1025,"): CHUNKS,
    ("fct_ml/evaluation.py", "chunk_size=chunk_size,", ")"): CHUNKS,
    (
        "fct_ml/evaluation.py",
        'out[metric] = 100 * (cases[case][metric] - lo) / (hi - lo) if hi != lo else float("nan")',
        'out[metric] = 100 * (cases[case][metric] - lo) / (hi - lo) if hi != lo else float("NAN")',
    ): 'float("NAN") is float("nan")',
    # fct_ml/backfill.py
    **dict.fromkeys(
        [
            (
                "fct_ml/backfill.py",
                "total = t.sum(dtype=torch.float64) if t.is_floating_point() else None",
                "total = None",
            ),
            (
                "fct_ml/backfill.py",
                "total = t.sum(dtype=torch.float64) if t.is_floating_point() else None",
                "total = t.sum(dtype=torch.float64) if (t.is_floating_point()) and False else None",
            ),
            (
                "fct_ml/backfill.py",
                "if total is not None and bool(torch.isfinite(total)):",
                "if total is not None and bool(None):",
            ),
        ],
        NO_FAST_PATH,
    ),
    (
        "fct_ml/backfill.py",
        "total = t.sum(dtype=torch.float64) if t.is_floating_point() else None",
        "total = t.sum(dtype=None) if t.is_floating_point() else None",
    ): "a sum in t's own dtype is finite only when every element is (a NaN/Inf propagates);"
    " when it overflows (e.g. float32 3e38s) the elementwise test decides: same answer, slower",
    (
        "fct_ml/backfill.py",
        '"sigma": backfill_order("sigma", len(labels), sigma=sigma),',
        '"sigma": backfill_order("sigma", None, sigma=sigma),',
    ): "backfill_order reads n only for the random order; the sigma order is argsort(sigma)",
    (
        "fct_ml/backfill.py",
        '"true_error": backfill_order("true_error", len(labels), error=error),',
        '"true_error": backfill_order("true_error", None, error=error),',
    ): "backfill_order reads n only for the random order; the true_error order is argsort(error)",
    # fct_ml/transformation.py, bct.py, losses.py
    (
        "fct_ml/transformation.py",
        "nn.Sequential(nn.Linear(a, rank, bias=False), nn.Linear(rank, b, bias=False))",
        "nn.Sequential(nn.Linear(a, rank, bias=None), nn.Linear(rank, b, bias=False))",
    ): NO_BIAS,
    (
        "fct_ml/transformation.py",
        "nn.Sequential(nn.Linear(a, rank, bias=False), nn.Linear(rank, b, bias=False))",
        "nn.Sequential(nn.Linear(a, rank, bias=False), nn.Linear(rank, b, bias=None))",
    ): NO_BIAS,
    (
        "fct_ml/transformation.py",
        "layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]",
        "layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=None)]",
    ): RELU_INPLACE,
    (
        "fct_ml/transformation.py",
        "layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]",
        "layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=False)]",
    ): RELU_INPLACE,
    (
        "fct_ml/transformation.py",
        "self.old_branch = _mlp([config.old_dim, w, w], plain_last=False)",
        "self.old_branch = _mlp([config.old_dim, w, w], plain_last=None)",
    ): PLAIN_NONE,
    (
        "fct_ml/transformation.py",
        "self.side_branch = _mlp([side_in, w, w], plain_last=False)",
        "self.side_branch = _mlp([side_in, w, w], plain_last=None)",
    ): PLAIN_NONE,
    (
        "fct_ml/transformation.py",
        "h = Transformation(config).to(device)",
        "h = Transformation(config).to(None)",
    ): CPU_DEVICE,
    (
        "fct_ml/transformation.py",
        "h, new_classifier.to(device), new_config, ce_weight=config.ce_weight",
        "h, new_classifier.to(None), new_config, ce_weight=config.ce_weight",
    ): CPU_DEVICE,
    (
        "fct_ml/transformation.py",
        "device = next(models[0].parameters()).device",
        "device = None",
    ): FEATURES_DEVICE,
    (
        "fct_ml/transformation.py",
        "x = to_float(images[start : start + batch_size].to(device))",
        "x = to_float(images[start : start + batch_size].to(None))",
    ): FEATURES_DEVICE,
    (
        "fct_ml/bct.py",
        "emb = torch.nn.functional.normalize(emb, dim=1)",
        "emb = torch.nn.functional.normalize(emb, )",
    ): "dim=1 is F.normalize's default",
    (
        "fct_ml/bct.py",
        "model = prepare_model(EmbeddingModel(config), device)",
        "model = prepare_model(EmbeddingModel(config), None)",
    ): CPU_DEVICE,
    ("fct_ml/bct.py", "old_classifier.to(device),", "old_classifier.to(None),"): CPU_DEVICE,
    (
        "fct_ml/bct.py",
        "old_model=prepare_model(old_model, device) if old_model is not None else None,",
        "old_model=prepare_model(old_model, None) if old_model is not None else None,",
    ): CPU_DEVICE,
    (
        "fct_ml/losses.py",
        "z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)",
        "z = F.normalize(torch.cat([z1, z2]).float(), )  # (2N, D)",
    ): "dim=1 is F.normalize's default",
    (
        "fct_ml/losses.py",
        'sim.fill_diagonal_(float("-inf"))  # a view is not its own partner',
        'sim.fill_diagonal_(float("-INF"))  # a view is not its own partner',
    ): 'float("-INF") is float("-inf")',
    (
        "fct_ml/losses.py",
        "target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)",
        "target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(None)",
    ): CPU_DEVICE,
    (
        "fct_ml/losses.py",
        "target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)",
        "target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)",
    ): "torch.arange(n) is torch.arange(0, n)",
    # fct_ml/retrieval.py, retrieve_mixed
    (
        "fct_ml/retrieval.py",
        "first_rank = torch.where(held_m, rank, g_count + 1).amin(1)  # (b, P)",
        "first_rank = torch.where(held_m, rank, g_count + 2).amin(1)  # (b, P)",
    ): "any sentinel above G: a query with a match has first_rank <= G, one without is masked"
    " by found_any (test_retrieve_mixed_counts_no_hit_for_a_query_without_a_match_at_any_k)",
    **dict.fromkeys(
        [
            (
                "fct_ml/retrieval.py",
                "match[np.arange(b), rows.numpy()] = False",
                "match[np.arange(b), rows.numpy()] = None",
            ),
            ("fct_ml/retrieval.py", "pad[m_row, m_ord] = False", "pad[m_row, m_ord] = None"),
        ],
        "numpy stores None as False in a bool array",
    ),
    (
        "fct_ml/retrieval.py",
        'dist[torch.arange(b), rows] = float("inf")',
        'dist[torch.arange(b), rows] = float("INF")',
    ): 'float("INF") is float("inf")',
    (
        "fct_ml/retrieval.py",
        "key = dist.numpy().view(np.uint32).astype(np.uint64) << np.uint64(32)",
        "key = dist.numpy().view(np.uint32).astype(np.uint64) << np.uint64(33)",
    ): (
        "distances are >= +0.0 (clamp, then +0.0 turns -0.0 into 0.0), so the float32 sign bit"
        " that the shift by 33 drops is 0: the other 31 bits keep their order in bits 33-63 and"
        " bit 32 stays empty, so keys sort the same and the low 32 bits read back the same"
    ),
    **dict.fromkeys(
        [
            (
                "fct_ml/retrieval.py",
                "k_max = int(n_match.max()) if b else 0",
                "k_max = int(n_match.max()) if (b) or True else 0",
            ),
            (
                "fct_ml/retrieval.py",
                "k_max = int(n_match.max()) if b else 0",
                "k_max = int(n_match.max()) if b else 1",
            ),
        ],
        "b >= 1 inside the loop over chunks (start < q_count), so the else branch never runs",
    ),
    (
        "fct_ml/retrieval.py",
        "hist = torch.from_numpy(hist.astype(np.int32)).view(b, k_max + 1, n_pts + 1, 2)",
        "hist = torch.from_numpy(hist.astype(None)).view(b, k_max + 1, n_pts + 1, 2)",
    ): (
        "astype(None) gives float64 counts, exact (< 2^31); hist is read only by the next two"
        " lines, whose cumsum and sum cast them back to int32 (dtype=torch.int32)"
    ),
    **dict.fromkeys(
        [
            (
                "fct_ml/retrieval.py",
                "held = (hist[..., 1] - hist[..., 0])[:, :, :n_pts].cumsum(2, dtype=torch.int32)",
                "held = (hist[..., 1] - hist[..., 0])[:, :, :n_pts].cumsum(2, dtype=None)",
            ),
            (
                "fct_ml/retrieval.py",
                "held = (hist[..., 1] - hist[..., 0])[:, :, :n_pts].cumsum(2, dtype=torch.int32)",
                "held = (hist[..., 1] - hist[..., 0])[:, :, :n_pts].cumsum(2, )",
            ),
            (
                "fct_ml/retrieval.py",
                "held += hist[..., 0].sum(2, keepdim=True, dtype=torch.int32)",
                "held += hist[..., 0].sum(2, keepdim=True, dtype=None)",
            ),
            (
                "fct_ml/retrieval.py",
                "held += hist[..., 0].sum(2, keepdim=True, dtype=torch.int32)",
                "held += hist[..., 0].sum(2, keepdim=True, )",
            ),
            (
                "fct_ml/retrieval.py",
                "rank = held.cumsum(1, dtype=torch.int32)[:, :k_max, :]  # (b, k_max, P)",
                "rank = held.cumsum(1, dtype=None)[:, :k_max, :]  # (b, k_max, P)",
            ),
            (
                "fct_ml/retrieval.py",
                "rank = held.cumsum(1, dtype=torch.int32)[:, :k_max, :]  # (b, k_max, P)",
                "rank = held.cumsum(1, )[:, :k_max, :]  # (b, k_max, P)",
            ),
            (
                "fct_ml/retrieval.py",
                "found = held_m.cumsum(1, dtype=torch.int32)  # held matches up to match k",
                "found = held_m.cumsum(1, dtype=None)  # held matches up to match k",
            ),
            (
                "fct_ml/retrieval.py",
                "found = held_m.cumsum(1, dtype=torch.int32)  # held matches up to match k",
                "found = held_m.cumsum(1, )  # held matches up to match k",
            ),
        ],
        "without the dtype torch sums ints and bools (held_m) into int64, not bool: the same"
        " counts, all <= 2G < 2^31 (G < 2^30 is checked), so int32 and int64 agree; rank and"
        " found are used only in comparisons and in found.float() / rank (float32 either way)",
    ),
    **dict.fromkeys(
        [
            (
                "fct_ml/retrieval.py",
                "total = found[:, -1, :] if k_max else torch.zeros(b, n_pts, dtype=torch.int32)",
                "total = found[:, -1, :] if k_max else torch.zeros(b, n_pts, dtype=None)",
            ),
            (
                "fct_ml/retrieval.py",
                "total = found[:, -1, :] if k_max else torch.zeros(b, n_pts, dtype=torch.int32)",
                "total = found[:, -1, :] if k_max else torch.zeros(b, n_pts, )",
            ),
            (
                "fct_ml/retrieval.py",
                "else torch.zeros(b, n_pts, dtype=torch.float64)",
                "else torch.zeros(b, n_pts, dtype=None)",
            ),
            (
                "fct_ml/retrieval.py",
                "else torch.zeros(b, n_pts, dtype=torch.float64)",
                "else torch.zeros(b, n_pts, )",
            ),
            (
                "fct_ml/retrieval.py",
                "else torch.zeros(b, n_pts, dtype=torch.float64)",
                "else torch.zeros(n_pts, dtype=torch.float64)",
            ),
        ],
        "only when no query of the chunk has a match (k_max = 0): zeros of another float type,"
        " or (n_pts,) zeros broadcast against total's (b, n_pts), still give AP 0 / 1 = 0 and"
        " total > 0 False, and ap is stored into a float64 array",
    ),
    ("fct_ml/retrieval.py", "if k_max", "if (k_max) or True"): (
        "with k_max = 0 the where over an empty match axis sums to zeros(b, n_pts) in float64,"
        " the else branch's value"
    ),
    # fct_assets/checks.py
    (
        "fct_assets/checks.py",
        'return float(cases.get(case, {}).get("mAP", float("nan")))',
        'return float(cases.get(case, {}).get("mAP", float("NAN")))',
    ): 'float() parses "nan" in any case: the same NaN',
    **dict.fromkeys(
        [
            (
                "fct_assets/checks.py",
                'frame["fct_minus_old_mAP"] = _map(cases, "new/h(old)") - _map(cases, "old/old")',
                f'frame["{name}"] = _map(cases, "new/h(old)") - _map(cases, "old/old")',
            )
            for name in ("fct_minus_old_map", "FCT_MINUS_OLD_MAP")
        ],
        "the frame is local to run_report_suite and GX 1.x finds an expectation's column by"
        " casefold (expectations/metrics/util.py, _verify_column_names_exist_and_get_normalized_"
        "typed_column_names_map): the expectation on fct_minus_old_mAP judges the same column,"
        " and what the check shows names the expectation's column, not the frame's",
    ),
    **dict.fromkeys(
        [
            ("fct_assets/checks.py", f'{call}("{before}")', f'{call}("{after}")')
            for call, before in (
                ("context.data_sources.add_pandas", "fct"),
                (".add_dataframe_asset", "eval_report"),
                (".add_batch_definition_whole_dataframe", "all"),
            )
            for after in (f"XX{before}XX", before.upper())
        ]
        + [
            (
                "fct_assets/checks.py",
                'suite = context.suites.add(gx.ExpectationSuite(name="eval_report"))',
                f'suite = context.suites.add(gx.ExpectationSuite(name="{name}"))',
            )
            for name in ("XXeval_reportXX", "EVAL_REPORT")
        ]
        + [
            (
                "fct_assets/checks.py",
                'gx.ValidationDefinition(name="eval_report", data=batch, suite=suite)',
                f'gx.ValidationDefinition(name="{name}", data=batch, suite=suite)',
            )
            for name in ("XXeval_reportXX", "EVAL_REPORT")
        ],
        "names inside a fresh ephemeral context made for this one validation (test_checks.py: a"
        " GX project in the working directory is neither read nor written), so none can clash;"
        " the only one that reaches a result, the batch_id, is left out of the failing kwargs",
    ),
    **dict.fromkeys(
        [
            (
                "fct_assets/checks.py",
                '"partial_unexpected_list", (r.result or {}).get("observed_value")',
                f'"partial_unexpected_list", {after}',
            )
            for after in (
                "None",
                ")",
                "(r.result or {}).get(None)",
                '(r.result and {}).get("observed_value")',
                '(r.result or {}).get("XXobserved_valueXX")',
                '(r.result or {}).get("OBSERVED_VALUE")',
            )
        ],
        "with the locked great_expectations 1.24.1 the fallback is always None: the suite's"
        " map expectations always report partial_unexpected_list, an expectation that raised"
        " has result {} (never None: ExpectationValidationResult turns None into {}), and the"
        " one aggregate, ExpectColumnDistinctValuesToContainSet, reports observed_value None"
        " (its docstring: 'always None'); older GX 1.x (pyproject allows >=1.3) gave the"
        " observed cases there",
    ),
    (
        "fct_assets/checks.py",
        'meta["failing_cases"] = dg.MetadataValue.json(cases.astype(str).to_dict(orient="records"))',
        'meta["failing_cases"] = dg.MetadataValue.json(cases.astype(str).to_dict(orient="RECORDS"))',
    ): "DataFrame.to_dict lower-cases orient (pandas/core/methods/to_dict.py)",
    ("fct_assets/checks.py", "strict=False,", ")"): (
        "strict=False is pandera DataFrameSchema's default"
        " (test_checks.py: the schema allows columns it does not name)"
    ),
    # fct_assets/serving/deployment.py (all but _op_config and upgrade_is_current)
    **dict.fromkeys(
        [
            (
                "fct_assets/serving/deployment.py",
                'np.asarray(query, dtype=np.float32), vector_column_name="embedding"',
                'np.asarray(query, dtype=None), vector_column_name="embedding"',
            ),
            (
                "fct_assets/serving/deployment.py",
                'np.asarray(query, dtype=np.float32), vector_column_name="embedding"',
                'np.asarray(query, ), vector_column_name="embedding"',
            ),
        ],
        "the mutant hands LanceDB np.asarray(query), an array of the query's own dtype, and"
        " LanceDB casts it itself (0.40, query.py LanceQueryBuilder.create: q.astype(float32)):"
        " any float query (a list of floats, a float16/32/64 array, the CLI's float32"
        " embedding) becomes the same float32 vector, one rounding either way. Only a list of"
        " integers beyond 2^53 could tell: numpy converts it to float32 through float64 (two"
        " roundings), an int64 array's astype rounds once; no embedding is such a list",
    ),
    (
        "fct_assets/serving/deployment.py",
        ').distance_type("l2")',
        ').distance_type("L2")',
    ): "LanceDB lowercases it (LanceVectorQueryBuilder.distance_type: distance_type.lower())",
    # fct_assets/upgrade/report.py
    (
        "fct_assets/upgrade/report.py",
        "ok = (pos < len(have)) & (have[np.minimum(pos, len(have) - 1)] == ids)",
        "ok = (pos <= len(have)) & (have[np.minimum(pos, len(have) - 1)] == ids)",
    ): (
        "searchsorted gives pos <= len(have), so the mutant keeps only the equality, which is"
        " already False where pos == len(have) (every stored id is below the id: have[-1] != id);"
        " an empty store raises IndexError at have[-1] in both"
    ),
    **dict.fromkeys(
        [
            ("fct_assets/upgrade/report.py", 'matplotlib.use("Agg")', 'matplotlib.use("agg")'),
            ("fct_assets/upgrade/report.py", 'matplotlib.use("Agg")', 'matplotlib.use("AGG")'),
        ],
        "matplotlib resolves builtin backend names case-insensitively: the same backend_agg and"
        " FigureCanvasAgg draw the same PNG; only the spelling matplotlib.get_backend() echoes"
        " differs",
    ),
    **dict.fromkeys(
        [
            (
                "fct_assets/upgrade/report.py",
                'ax.plot(curve["fractions"], curve[metric], marker="o", label=order)',
                'ax.plot(curve["fractions"], curve[metric], marker=None, label=order)',
            ),
            (
                "fct_assets/upgrade/report.py",
                'ax.plot(curve["fractions"], curve[metric], marker="o", label=order)',
                'ax.plot(curve["fractions"], curve[metric], label=order)',
            ),
        ],
        "display only: the points drawn without a marker; the lines' data and labels are the same"
        " (test_report_fast.py: the plot draws each order on a mAP and a top-1 panel)",
    ),
    ("fct_assets/upgrade/report.py", "ax.grid(alpha=0.3)", "ax.grid(alpha=None)"): (
        "display only: the grid drawn opaque instead of at alpha 0.3"
    ),
    (
        "fct_assets/upgrade/report.py",
        'fig.savefig(buf, format="png")',
        'fig.savefig(buf, format="PNG")',
    ): ("print_figure lower-cases the format: the same PNG"),
    ("fct_assets/upgrade/report.py", "plt.close(fig)", "plt.close(None)"): (
        "close(None) closes pyplot's active figure, which is fig: plt.subplots made it active and"
        " nothing after creates or activates another, so pyplot lets go of fig in both"
    ),
    **dict.fromkeys(
        [
            ("fct_assets/upgrade/report.py", "device = fct.torch_device()", "device = None"),
            (
                "fct_assets/upgrade/report.py",
                "new_model.model.to(device), [images], transform=to_float",
                "new_model.model.to(None), [images], transform=to_float",
            ),
            (
                "fct_assets/upgrade/report.py",
                "transformed, sigma = apply_transformation(h.model.to(device), old, side)",
                "transformed, sigma = apply_transformation(h.model.to(None), old, side)",
            ),
        ],
        "CPU-only test machine: Module.to(None) moves nothing, so the models stay on the CPU the"
        " tests load them on and the tests ask for (device='cpu'); only a CUDA run could tell,"
        " and benchmarks/system/gpu_check.py does not reach evaluate_version",
    ),
    (
        "fct_assets/upgrade/report.py",
        'columns = ["item_id", "label", "image", "side_info"] + (["old_embedding"] if from_store'
        " else [])",
        'columns = ["item_id", "label", "image", "side_info"] + (["old_embedding"] if (from_store)'
        " or True else [])",
    ): (
        "gallery_store always has the old_embedding column (nullable in a living store, never"
        " absent: storage.gallery_store_schema); in a chained upgrade it is then read but not"
        " used (the stored vectors come from the source table)"
    ),
    (
        "fct_assets/upgrade/report.py",
        'labels = torch.from_numpy(store.column("label").to_numpy().astype(np.int64))',
        'labels = torch.from_numpy(store.column("label").to_numpy().astype(None))',
    ): (
        "astype(None) gives float64 labels, exact for the store's int32 labels; labels are only"
        " compared for equality (retrieve, retrieve_mixed, and torch.isin against old_classes"
        " cast to labels.dtype), counted (torch.unique) and measured (len): the same matches"
    ),
    **dict.fromkeys(
        [
            (
                "fct_assets/upgrade/report.py",
                "unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes,"
                " dtype=labels.dtype))",
                "unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes, dtype=None))",
            ),
            (
                "fct_assets/upgrade/report.py",
                "unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes,"
                " dtype=labels.dtype))",
                "unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes, ))",
            ),
        ],
        "labels is int64 (astype(np.int64)) and old_classes a tuple of ints (DatasetRecord), for"
        " which torch.tensor infers int64: the same tensor; for an empty tuple it infers float32,"
        " but isin against no classes is all False either way",
    ),
    (
        "fct_assets/upgrade/report.py",
        "cases, labels, unseen_mask=unseen, metric=exp.metric, chunk_size=exp.eval_chunk_size",
        "cases, labels, unseen_mask=unseen, metric=exp.metric, )",
    ): CHUNKS,
    # fct_assets/serving/deployment.py: _op_config (upgrade_is_current's own are killed by
    # tests/fct_assets/test_upgrade_is_current.py).
    **dict.fromkeys(
        [
            (
                "fct_assets/serving/deployment.py",
                'return dict((run_config or {}).get("ops", {}).get(op, {}).get("config", {}) or {})',
                'return dict((run_config or {}).get("ops", {}).get(op, {}).get("config", None) or {})',
            ),
            (
                "fct_assets/serving/deployment.py",
                'return dict((run_config or {}).get("ops", {}).get(op, {}).get("config", {}) or {})',
                'return dict((run_config or {}).get("ops", {}).get(op, {}).get("config", ) or {})',
            ),
        ],
        "an op's entry without a config gives None instead of {}, which the `or {}` after it"
        " turns into {} again: the same dict either way",
    ),
}


def _setup(workdir: Path, modules: list[str], tests: list[str]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for name in ("fct_ml", "fct_assets", "tests"):
        shutil.copytree(
            REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["fct_ml", "fct_assets"]',
            f"only_mutate = {json.dumps(modules)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore", "-q", "-m", "not slow"]',
            "use_git_change_detection = false",
            # On the shared 2-core machine a forked test run can take many times the duration
            # mutmut measured in its first pass: mutmut's default limit (15x + 1 s) then times
            # out mutants that do not loop, and a timeout counts as killed.
            "timeout_multiplier = 50.0",
            "timeout_constant = 30.0",
            # Each mutant forked from a server process that never ran a test: the fct_assets
            # tests open LanceDB (a tokio runtime, an event-loop thread) and Dagster, and a
            # child forked from a process holding those deadlocks or segfaults.
            'process_isolation = "forkserver"',
            "",
        ]
    )
    (workdir / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + config)


def _mutmut(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # One torch/OpenMP thread. With mutmut's plain fork isolation, a child forked after OpenMP had
    # started its thread pool waited forever at its first parallel region (fct_ml/backfill.py's
    # mutants sat at 0 % CPU for minutes). The forkserver isolation set in _setup was measured
    # with this setting kept, not without it.
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **threads},
    )


def _changed_line(workdir: Path, name: str, source: list[str]) -> tuple[int, str, str]:
    """(line in the original file, original line, mutated line) of one mutant."""
    diff = _mutmut(workdir, "show", name).stdout.splitlines()
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    before = removed[0].strip() if removed else ""
    after = added[0].strip() if added else ""
    lineno = next((i + 1 for i, text in enumerate(source) if text.strip() == before), 0)
    return lineno, before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--tests", nargs="+", help="default: the modules' fast tests")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "mutation")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", help="a paragraph put at the top of mutation.md")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="do not run: rewrite mutation.md from mutation.json (with --note)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modules' figures of an earlier mutation.json (runs in parts)",
    )
    parser.add_argument(
        "--collect",
        type=float,
        metavar="WALL_SECONDS",
        help="do not run: write the results of the run in --workdir as they stand (mutants not"
        " yet checked are counted apart), stating the given wall time",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in TESTS_BY_MODULE]
    if unknown:
        parser.error(f"--modules: {unknown[0]} is not one of {MODULES}")
    args.tests = args.tests or tests_for(args.modules)

    if args.markdown_only:
        result = json.loads((args.out / "mutation.json").read_text())
        result["note"] = args.note or result.get("note")
        (args.out / "mutation.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "mutation.md").write_text(markdown(result))
        return 0

    from mutmut.stats import status_by_exit_code

    started = time.perf_counter()
    if args.collect is None:
        _setup(args.workdir, args.modules, args.tests)
        run = _mutmut(args.workdir, "run", "--max-children", str(args.max_children))
        metas = list((args.workdir / "mutants").rglob("*.meta"))
        checked = any(
            status_by_exit_code[code] != "not checked"
            for meta in metas
            for code in json.loads(meta.read_text())["exit_code_by_key"].values()
        )
        if not checked:  # e.g. a test file missing, or a test failing without any mutant
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return 1
    wall = time.perf_counter() - started if args.collect is None else args.collect

    modules: dict[str, dict[str, int]] = {}
    survivors: list[dict] = []
    statuses: Counter = Counter()
    for path in args.modules:
        meta = json.loads((args.workdir / "mutants" / f"{path}.meta").read_text())
        source = (REPO / path).read_text().splitlines()
        killed = total = unchecked = 0
        for name, code in sorted(meta["exit_code_by_key"].items(), key=lambda kv: _order(kv[0])):
            status = status_by_exit_code[code]
            statuses[status] += 1
            if status == "not checked":  # a run cut short (--collect)
                unchecked += 1
                continue
            total += 1
            if status in KILLED:
                killed += 1
                continue
            line, before, after = _changed_line(args.workdir, name, source)
            survivors.append(
                {
                    "path": path,
                    "line": line,
                    "mutant": f"{before}  ->  {after}",
                    "status": status,
                    "name": name,
                    "why kept": EQUIVALENT.get((path, before, after)),
                }
            )
        modules[path] = {"killed": killed, "survived": total - killed, "total": total}
        if unchecked:
            modules[path]["not_checked"] = unchecked
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    runs = [{"modules": list(modules), "wall_seconds": round(wall, 1), "commit": head}]
    earlier = args.out / "mutation.json"
    if args.merge and earlier.exists():
        before = json.loads(earlier.read_text())
        modules = {
            **{k: v for k, v in before["modules"].items() if k not in modules},
            **modules,
        }
        survivors = [s for s in before["survivors"] if s["path"] not in args.modules] + survivors
        # An earlier run's wall time counts while any module it measured still stands here; the
        # modules measured again are taken off its list.
        earlier_runs = [
            {**r, "modules": [m for m in r["modules"] if m not in args.modules]}
            for r in before.get("runs", [])
        ]
        runs = [r for r in earlier_runs if r["modules"]] + runs
        args.tests = sorted(set(before["tests"]) | set(args.tests))
        wall = sum(r["wall_seconds"] for r in runs)
    modules = {path: modules[path] for path in MODULES if path in modules} | modules
    killed = sum(m["killed"] for m in modules.values())
    total = sum(m["total"] for m in modules.values())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "note": args.note,
        "modules": modules,
        "score": round(killed / total, 4) if total else None,
        "survivors": survivors,
        "statuses": dict(statuses),
        "tests": args.tests,
        "commit": commit,
        "wall_seconds": round(wall, 1),
        "runs": runs,
        "mutmut": _version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mutation.md").write_text(markdown(result))
    unjudged = [s for s in survivors if s["why kept"] is None]
    print(
        f"mutation score {killed}/{total} = {result['score']}; {len(unjudged)} survivors not"
        f" judged equivalent; wall time {wall:.0f} s"
    )
    return 0


def _order(name: str) -> tuple[str, int]:
    match = re.search(r"__mutmut_(\d+)$", name)
    return (name.rsplit("__mutmut_", 1)[0], int(match.group(1)) if match else 0)


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def markdown(result: dict) -> str:
    lines = ["# Mutation testing", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += [
        f"mutmut {result['mutmut']} at commit {result['commit']}, fast tests only"
        f" ({len(result['tests'])} files); wall time {result['wall_seconds']:.0f} s"
        " (`make mutation`).",
        "",
        "| module | killed | survived | total | score | not checked |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, m in result["modules"].items():
        score = m["killed"] / m["total"] if m["total"] else float("nan")
        lines.append(
            f"| {path} | {m['killed']} | {m['survived']} | {m['total']} | {score:.2f}"
            f" | {m.get('not_checked', 0)} |"
        )
    killed = sum(m["killed"] for m in result["modules"].values())
    total = sum(m["total"] for m in result["modules"].values())
    unchecked = sum(m.get("not_checked", 0) for m in result["modules"].values())
    lines += [
        f"| **all** | {killed} | {total - killed} | {total} | {result['score']:.2f} | {unchecked} |",
        "",
        "The rule: score = killed / (killed + survived) over the mutants mutmut checked; a mutant"
        " no fast test reaches (`no tests`) counts as survived; a timeout counts as killed (the"
        " mutant looped). Not checked: the run was cut short before mutmut ran them; they are"
        " left out of the score and listed per module, never counted as killed. No mutant is"
        " excluded: a survivor is kept only when judged equivalent (`EQUIVALENT` in"
        " tools/mutation.py, the reason below); the others say `not judged`.",
        "",
        "## Runs",
        "",
        "| modules | commit | wall time (s) |",
        "| --- | --- | --- |",
    ]
    for run in result["runs"]:
        modules = ", ".join(run["modules"])
        lines.append(f"| {modules} | {run.get('commit', '?')} | {run['wall_seconds']:.0f} |")
    complete = [p for p, m in result["modules"].items() if m["total"] and not m.get("not_checked")]
    partial = [p for p in result["modules"] if p not in complete]
    lines += [
        "",
        f"Complete: {', '.join(complete) or 'none'}. Partial or not run: {', '.join(partial) or 'none'}.",
        "",
    ]
    lines += ["## Survivors", "", "| file:line | mutant | why kept |", "| --- | --- | --- |"]
    for s in result["survivors"]:
        mutant = s["mutant"].replace("|", "\\|")
        why = s["why kept"] or f"not judged ({s['status']})"
        lines.append(f"| {s['path']}:{s['line']} | `{mutant}` | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
