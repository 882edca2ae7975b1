# Training defaults shared by every experiment (overridden per experiment / on the command line).
from detr_variants.engine.devices import resolve_device

train = dict(
    output_dir="./output",
    init_checkpoint="",  # path or URL (pin a URL's file with "?sha256=<hex>")
    trust_checkpoint=False,  # True: unpickle checkpoints unrestricted (only files you trust)
    allow_random_weights=False,  # True: --eval-only / the predictor without a checkpoint
    # "cuda" when available, else "cpu", resolved when the config is loaded: detectron2's own tools
    # call model.to(cfg.train.device) directly. "auto" stays accepted as an override.
    device=str(resolve_device("auto")),
    epochs=None,  # converted to iterations from the dataset size and total batch size
    max_iter=None,  # when set, wins over epochs
    amp=dict(enabled=False, dtype="bfloat16"),  # bfloat16 on CPU; float16 or bfloat16 on CUDA
    clip_grad=dict(
        enabled=True, max_norm=0.1, params=None
    ),  # params: a name filter, e.g. "encoder."
    ema=dict(enabled=False, decay=0.9998, warmup=2000.0),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    checkpointer=dict(period=5000, max_to_keep=3),
    eval_period=5000,  # 0: evaluate only at the end; -1: never
    log_period=20,
    # return the heap's free pages to the OS after a step that grew the resident size by this many
    # MiB since the last time (glibc malloc_trim); 0: never
    release_memory_growth_mib=512,
    seed=-1,  # >= 0 for reproducible runs
)
