"""Training on an export: ``curate train`` / a flow's ``train:`` section (TRL + PEFT, the ``train`` extra).

    from curate.train import TrainSpec, train
    record = train(TrainSpec(epochs=1), "out/select")      # a run's output_dir or its export folder
    record["weights"]                                      # out/select/train/<key>/adapter
"""

from curate.train.sft import ExportFile, locate_export, train
from curate.train.spec import LoRASpec, TrainSpec

__all__ = ["ExportFile", "LoRASpec", "TrainSpec", "locate_export", "train"]
