"""Options shared by several commands, defined once so their names and help agree."""
from __future__ import annotations

import typer

ArchOpt = typer.Option(None, "--arch", help="Architecture of a state-dict input: torchvision:<name>, "
                       "package.module:factory, mlp-1024 or lenet5.")
ArchArgOpt = typer.Option(None, "--arch-arg", help="key=value argument for the architecture (repeatable), "
                          "e.g. num_classes=10.")
ImportOpt = typer.Option(None, "--import", help="Python file to import first, so its factories and classes "
                         "resolve (repeatable).")
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow loading a whole pickled nn.Module. Unpickling "
                        "runs code from the file: only for files you trust.")
InputShapeOpt = typer.Option(None, "--input-shape", help="Input shape with batch dimension, e.g. 1,3,32,32 "
                             "(default: recorded in the checkpoint, or the architecture's usual input).")
RecipeOpt = typer.Option(..., "--recipe", "-r", help="YAML recipe (see configs/ and docs/recipes.md).")
OptionalRecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe (see configs/ and docs/recipes.md). "
                                 "Optional with --budget: low-rank for Linear layers, Tucker-2 for convolutions.")
BudgetOpt = typer.Option(None, "--budget", "-b", help="Whole-model budget: params:R or macs:R (compressed / dense, "
                         "e.g. params:0.5); ranks are chosen per layer by measured sensitivity. Replaces the "
                         "recipe's budget target.")
DatasetOpt = typer.Option(..., "--dataset", "-d", help="mnist, fashion-mnist, cifar10, tiny-imagenet, synthetic, or "
                          "folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*).")
DataDirOpt = typer.Option(None, "--data-dir", help="Dataset root (default: $TNCOMPRESS_DATA, else ~/.cache/tncompress/data).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value: key.path=value, e.g. defaults.Linear.rank=4 "
                      "or layers.0.rank=0.3 (repeatable).")

BatchSizeOpt = typer.Option(128, "--batch-size", min=1)
OptimizerOpt = typer.Option("sgd", "--optimizer", help="sgd or adamw.")
WeightDecayOpt = typer.Option(5e-4, "--weight-decay")
MomentumOpt = typer.Option(0.9, "--momentum")
ScheduleOpt = typer.Option("cosine", "--schedule", help="cosine or constant.")
LabelSmoothingOpt = typer.Option(0.0, "--label-smoothing")
AugmentOpt = typer.Option(False, "--augment/--no-augment", help="Standard light augmentation.")
AmpOpt = typer.Option("auto", "--amp", help="auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16 or off.")
TrainDeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SeedOpt = typer.Option(0, "--seed")
WorkersOpt = typer.Option(0, "--workers", min=0, help="DataLoader worker processes.")
LimitTrainOpt = typer.Option(None, "--limit-train", min=1, help="Use only the first N training images.")
LimitTestOpt = typer.Option(None, "--limit-test", min=1, help="Use only the first N test images.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from OUTPUT.state.pt.")
GradClipOpt = typer.Option(None, "--grad-clip")
ChannelsLastOpt = typer.Option(
    None, "--channels-last/--no-channels-last",
    help="Train in channels-last (NHWC) layout. Default: on for models with 2-D convolutions, where it was "
         "measured faster (docs/train-speed.md).")

MeanOpt = typer.Option(None, "--mean", help="Per-channel mean the model was trained with, comma-separated (e.g. "
                       "0.485,0.456,0.406); recorded in the compressed checkpoint. Default: recorded, else the dataset's.")
StdOpt = typer.Option(None, "--std", help="Per-channel std the model was trained with, comma-separated; recorded "
                      "like --mean.")
CalibrationDataOpt = typer.Option(None, "--calibration-data", help="Real images to calibrate on: a dataset name or "
                                  "folder:PATH (its training split, with the model's preprocessing). Default: the "
                                  "recipe's Gaussian-noise batch.")
CalibrationSizeOpt = typer.Option(512, "--calibration-size", min=1, help="Images taken from --calibration-data.")
