"""K7: K4's k4_irdump.py + the 5.2 L4 fixture: hash of the exported Relax module text (its TIR kernels
included) of each build (run from a snapshot: cwd = PYTHONPATH = it)."""
import hashlib
from pathlib import Path
from parity.checkpoint import load_checkpoint
from parity.compiled import build
from parity.synth import shape_config
for fx in ("rwkv5_2-L4-C128-H2", "rwkv5_2-L2-C144-H12", "rwkv5_1-L2-C64-H8", "rwkv5_0-L2-C64-H2", "rwkv4-L2-C64", "1.5b"):
    cfg = shape_config("1.5b", version="5.2") if fx == "1.5b" else load_checkpoint(Path("fixtures") / f"{fx}.pth").config
    todo = ((("cuda", False, "float16"), ("cuda", False, "float32")) if fx == "1.5b" else
            (("llvm", False, "float32"), ("llvm", True, "float32"), ("llvm", False, "float16"), ("llvm", True, "float16"),
             ("cuda", True, "float32"), ("cuda", True, "float16"), ("cuda", False, "float32"), ("cuda", False, "float16")))
    for target, debug, dtype in todo:
        model = build.model_for(cfg, debug=debug, target=target, dtype=dtype)
        mod, params = model.export_tvm(spec=model.get_default_spec())
        h = hashlib.sha256(mod.script().encode()).hexdigest()[:12]
        print(fx, target, "debug" if debug else "plain", dtype, h, len(params), flush=True)
