"""The default `train` profile end to end on stdlib-built data (when data/shards is not built yet): wall time, loss vs unigram."""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import build_stdlib_data
from pipeline.config import load_params, parse_params
from pipeline.train.trainer import train
root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="default_train_"))
base = load_params("params.yaml").model_dump(mode="json", exclude={"source_file"})
if not (root / "shards/train/index.json").exists():
    tok, shards = build_stdlib_data(root, base["shards"]["max_seq_len"], base["tokenizer"]["vocab_size"])
base["tokenizer"]["out"], base["shards"]["out"] = str(root / "tokenizer"), str(root / "shards")
base["tracking"].update(wandb_mode="disabled", reports_dir=str(root / "reports"))
base["train"].update(save_folder=str(root / "ckpt"), reports_dir=str(root / "reports/train"), final_model=str(root / "final"))
t = time.time()
s = train(parse_params(base))
print("WALL", time.time() - t)
print(json.dumps(s, indent=1, default=str))
