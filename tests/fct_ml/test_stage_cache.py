"""fct_ml.reproduce.StageCache: a model trained once is read back bit for bit, with the seconds
its training took, so a study that reuses it still reports what the stage costs."""

from __future__ import annotations

import time

import torch

from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.reproduce import StageCache
from fct_ml.training import EpochRecord

CPU = torch.device("cpu")


def _train(calls: list[int], pause: float = 0.0):
    def train():
        calls.append(1)
        time.sleep(pause)  # stands for the training's time; the cache times train() itself
        torch.manual_seed(0)
        model = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=4, num_classes=3))
        return model, [EpochRecord(epoch=1, seconds=pause, lr=0.1, parts={"ce": 1.0})]

    return train


def test_a_cached_stage_is_read_back_with_its_training_time(tmp_path):
    calls: list[int] = []
    first = StageCache(tmp_path, "data:0.1", seed=0, device=CPU)
    trained, history = first("old_model", ["key"], _train(calls, pause=0.2))
    assert calls == [1] and first.read_seconds == {}  # trained, not read

    again = StageCache(tmp_path, "data:0.1", seed=0, device=CPU)
    read, read_history = again("old_model", ["key"], _train(calls))
    assert calls == [1]  # not trained twice
    for name, value in trained.state_dict().items():
        assert torch.equal(read.state_dict()[name].cpu(), value.cpu()), name
    assert read_history == history
    # The entry's record is train()'s own wall time: at least the 0.2 s pause, well under 5 s.
    assert set(again.read_seconds) == {"old_model"}
    assert 0.2 <= again.read_seconds["old_model"] < 5.0


def test_another_seed_or_key_trains_its_own(tmp_path):
    calls: list[int] = []
    StageCache(tmp_path, "data:0.1", seed=0, device=CPU)("old_model", ["key"], _train(calls))
    StageCache(tmp_path, "data:0.1", seed=1, device=CPU)("old_model", ["key"], _train(calls))
    StageCache(tmp_path, "data:0.1", seed=0, device=CPU)("old_model", ["other"], _train(calls))
    assert calls == [1, 1, 1]


def test_an_entry_written_before_the_record_reads_as_unknown(tmp_path):
    cache = StageCache(tmp_path, "data:0.1", seed=0, device=CPU)
    cache("old_model", ["key"], _train([]))
    (entry,) = tmp_path.glob("old_model-*.pt")
    saved = torch.load(entry, weights_only=True)
    del saved["train_seconds"]
    torch.save(saved, entry)
    again = StageCache(tmp_path, "data:0.1", seed=0, device=CPU)
    again("old_model", ["key"], _train([]))
    assert again.read_seconds == {"old_model": None}
