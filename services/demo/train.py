"""``step37-serve train-demo``: train the bundled ``step37-tiny`` model from scratch.

The vision tower, the align projector and the decoder are trained end to end on
freshly generated scenes (``services.demo.scenes``), with next-token loss on the
caption tokens only, through the real ``ImageInsertEmbedding`` path — the same
modules, preprocessing and prompt template the services run. Prompts vary (no text,
an instruction before or after the image, unknown words) so the model learns to
caption whatever the user writes around the image. Seeded; CPU-friendly.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import itertools
import json
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from encoder_server.model import VisionConfig, init_random, load_vision_model, resolve_device
from encoder_server.preprocess import normalise_levels, rgb_levels
from lm_worker.image_insert_embedding import ImageForInsert, ImageInsertEmbedding
from lm_worker.model.config import DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.loading import load_lm
from lm_worker.tokens import Step37Tokenizer, build_word_tokenizer
from services.demo.captions import CAPTION_VOCABULARY, score_captions
from services.demo.checkpoint import save_checkpoint
from services.demo.pipeline import InProcessCaptioner
from services.demo.scenes import generate_scene

# Instructions seen in training, placed before or after the image.
PROMPT_TEMPLATES = (
    "<image>",
    "<image>",
    "describe the image <image>",
    "<image> describe the image .",
    "what is in this picture ? <image>",
    "caption this image : <image>",
    "<image> what do you see ?",
)
PROMPT_WORDS = ("describe", "image", "what", "is", "this", "picture", "?", "caption", ":", "do", "you", "see", ".")
DEMO_VOCABULARY = list(dict.fromkeys([*CAPTION_VOCABULARY, *PROMPT_WORDS]))
IGNORE = -100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="models/step37-tiny", help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=2220)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--schedule", choices=("cosine", "wsd"), default="wsd",
                        help="after warm-up: cosine decay, or warmup-stable-decay (constant, then a linear "
                             "decay over the last --decay-fraction of the steps)")
    parser.add_argument("--decay-fraction", type=float, default=0.3, help="share of the steps the wsd decay takes")
    parser.add_argument("--start-lr", type=float, default=7e-4,
                        help="a lower rate for the first --start-steps, then a ramp to --lr over --warmup-steps: "
                             "at the full rate the decoder can stay hundreds of steps on the plateau where it "
                             "writes the grammar without reading the image")
    parser.add_argument("--start-steps", type=int, default=350, help="how long --start-lr holds (0: no start rate)")
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="learning rate of the vision tower and projector, as a multiple of --lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--eval-seed", type=int, default=1_000_003, help="held-out scenes (training uses others)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: the usable cores shared out among the workers)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-parallel training processes, each drawing and training on its share of every "
                             "batch (0: one per CPU core the process may use, at most --batch-size); the batches "
                             "are the same for any number, the weights up to float rounding")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the tower and the decoder for training (~6 %% faster steps on two CPU cores, "
                             "compiling included); falls back to eager mode if compiling fails. Default: on the CPU "
                             "only")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, or auto (cuda when there is a GPU); on a GPU one process trains in float32 "
                             "while --render-processes draw the scenes")
    parser.add_argument("--render-processes", type=int, default=None,
                        help="processes rendering the scenes of coming batches (default: on a GPU the usable "
                             "cores but one; on the CPU none, each worker renders its share between steps)")
    parser.add_argument("--init-from", default=None,
                        help="continue from this checkpoint's weights and tokenizer (a fresh schedule)")


def render_examples(scene_seeds: Sequence[int], image_size: int) -> tuple[np.ndarray, list[str]]:
    """Scenes' pixels as the encoder's preprocessing reads them (8-bit levels ``[n, S, S, 3]``)
    and their captions. A plain function of the seeds, so other processes can render them."""
    scenes = [generate_scene(seed, image_size) for seed in scene_seeds]
    levels = np.stack([rgb_levels(scene.image, image_size) for scene in scenes])  # [n, S, S, 3] uint8
    return levels, [scene.caption for scene in scenes]


class Examples:
    """Builds training batches: scene → (pixels, input_ids, labels)."""

    def __init__(self, tokenizer: Step37Tokenizer, image_size: int, tokens_per_image: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        self.rng = random.Random(seed)
        self.unk_id = tokenizer.tokenizer.token_to_id("<unk>")

    def prompt_ids(self) -> list[int]:
        template = self.rng.choice(PROMPT_TEMPLATES)
        ids = self.tokenizer.build_prompt_ids(template, [self.tokens_per_image])
        if self.rng.random() < 0.15:  # words the tokenizer does not know arrive as <unk>
            unknown = [self.unk_id] * self.rng.randint(1, 4)
            position = self.rng.choice([1, len(ids)])
            ids = ids[:position] + unknown + ids[position:]
        return ids

    def draw(self, size: int) -> list[tuple[int, list[int]]]:
        """The next ``size`` examples of the stream: each one's scene seed and prompt ids."""
        return [(self.rng.getrandbits(63), self.prompt_ids()) for _ in range(size)]

    def batch(self, size: int, part: range | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``size`` examples of the stream, of which only those in ``part`` (all by
        default) are rendered and returned, on ``device`` (the CPU by default): a worker draws
        every example's seed and prompt, so that all workers walk the same stream, and renders
        only its own share."""
        part = range(size) if part is None else part
        drawn = [example for index, example in enumerate(self.draw(size)) if index in part]
        levels, captions = render_examples([seed for seed, _ in drawn], self.image_size)
        return self.assemble([prompt for _, prompt in drawn], torch.from_numpy(levels).to(device), captions)

    def assemble(self, prompts: Sequence[list[int]], levels: torch.Tensor,
                 captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels ``[b, 3, S, S]``, input_ids ``[b, S]``, labels ``[b, S]``) on the levels' device."""
        sequences, labels = [], []
        for prompt, caption in zip(prompts, captions, strict=True):
            target = self.tokenizer.encode_text(caption) + [self.tokenizer.eos_token_id]
            sequences.append(prompt + target)
            # Position t predicts token t+1: only caption (and EOS) targets count.
            labels.append([IGNORE] * (len(prompt) - 1) + target + [IGNORE])
        longest = max(len(s) for s in sequences)
        pad = self.tokenizer.tokenizer.token_to_id("<pad>")
        input_ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sequences])  # [b, S]
        label_ids = torch.tensor([lab + [IGNORE] * (longest - len(lab)) for lab in labels])  # [b, S]
        device = levels.device
        return normalise_levels(levels), input_ids.to(device), label_ids.to(device)

    def prefetched(self, size: int, pool: Executor, device: torch.device, ahead: int = 3,
                   chunk: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The stream's whole batches, their scenes rendered on ``pool`` ``ahead`` batches in
        advance: the same batches as :meth:`batch`, while the model trains on the current one."""
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) < ahead:
                drawn = self.draw(size)
                seeds = [seed for seed, _ in drawn]
                jobs = [pool.submit(render_examples, seeds[start : start + chunk], self.image_size)
                        for start in range(0, size, chunk)]
                pending.append(([prompt for _, prompt in drawn], jobs))
            prompts, jobs = pending.popleft()
            parts = [job.result() for job in jobs]
            levels = torch.from_numpy(np.concatenate([levels for levels, _ in parts])).to(device)
            yield self.assemble(prompts, levels, [caption for _, captions in parts for caption in captions])


def make_optimizer(vision: torch.nn.Module, decoder: torch.nn.Module, fusion: ImageInsertEmbedding,
                   args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over every weight once; the vision tower and the projector behind it learn
    at ``args.vision_lr_scale`` times the rate of the decoder (whose embedding the fusion
    module borrows)."""
    groups = [{"params": [*vision.parameters(), *fusion.align_projector.parameters()], "scale": args.vision_lr_scale},
              {"params": [*decoder.parameters()], "scale": 1.0}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["scale"]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak, or stay at the peak and
    decay linearly to 5 % over the last ``decay_fraction`` of the steps (wsd).

    With ``start_steps`` (0: off), the warm-up goes to ``start_lr``, which holds until
    ``start_steps``; the rate then ramps to ``lr`` over another ``warmup_steps``."""
    start_lr = args.start_lr if args.start_steps else args.lr
    if step < args.warmup_steps:
        return start_lr * (step + 1) / args.warmup_steps
    if step < args.start_steps:
        return start_lr
    if step < args.start_steps + args.warmup_steps and start_lr != args.lr:
        return start_lr + (args.lr - start_lr) * (step + 1 - args.start_steps) / args.warmup_steps
    if args.schedule == "wsd":
        decay_steps = max(1, round(args.decay_fraction * args.steps))
        remaining = args.steps - 1 - step
        return args.lr * (0.05 + 0.95 * min(1.0, remaining / decay_steps))
    ramped = args.start_steps + args.warmup_steps if start_lr != args.lr else args.warmup_steps
    progress = (step - ramped) / max(1, args.steps - ramped)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def caption_loss(fusion: ImageInsertEmbedding, decoder: Step37Decoder, im_start: int, features: torch.Tensor,
                 input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss (mean or sum) on the caption tokens of a batch whose tower features are computed."""
    fused = fusion(input_ids, [ImageForInsert(im_start, image_features=features)])  # [S, B, H]
    logits = decoder(fused)  # [S, B, V]
    return F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def evaluate(captioner: InProcessCaptioner, count: int, seed: int, image_size: int) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = [generate_scene(rng.getrandbits(63), image_size) for _ in range(count)]
    predictions: list[str] = []
    for start in range(0, count, 100):
        chunk = scenes[start : start + 100]
        predictions += captioner.caption([scene.image for scene in chunk])
    return score_captions(predictions, scenes)


def build_models(args: argparse.Namespace, out: Path):
    """Fresh seeded models, or the weights of ``--init-from`` to continue training."""
    if args.init_from:
        source = Path(args.init_from)
        tokenizer = Step37Tokenizer.from_file(source / "tokenizer.json")
        tokenizer.tokenizer.save(str(out / "tokenizer.json"))
        vision = load_vision_model(source, dtype=torch.float32, device="cpu")
        decoder, projector_state, text_config = load_lm(source, dtype=torch.float32, device="cpu")
    else:
        tokenizer = build_word_tokenizer(DEMO_VOCABULARY, out / "tokenizer.json")
        vision_config = VisionConfig.preset("step37-tiny")
        vision = init_random(vision_config, seed=args.seed, dtype=torch.float32, device="cpu")
        text_config = DecoderConfig.preset("step37-tiny", vocab_size=tokenizer.vocab_size,
                                           encoder_output_dim=vision_config.output_dim)
        decoder = Step37Decoder(text_config)
        projector_state = None
    fusion = ImageInsertEmbedding(decoder.embed_tokens, text_config.encoder_output_dim, text_config.hidden_size,
                                  text_config.projector_bias, placeholder_token_id=tokenizer.ids.im_patch)
    if projector_state is not None:
        fusion.align_projector.load_state_dict(projector_state)
    for module in (vision, decoder, fusion):
        module.train().requires_grad_(True)
    return vision, decoder, fusion, tokenizer, text_config


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def training_device(args: argparse.Namespace) -> torch.device:
    """The device of ``--device``: the CPU or a CUDA device that is there."""
    try:
        device = resolve_device(None if args.device == "auto" else args.device)
    except RuntimeError as exc:
        raise SystemExit(f"--device {args.device}: {exc}") from exc
    if device.type == "cuda" and (device.index or 0) < torch.cuda.device_count():
        return device
    if device.type == "cpu":
        return device
    raise SystemExit(f"--device {args.device}: not a CUDA device here; use cpu, cuda or cuda:N "
                     f"(this machine has {torch.cuda.device_count()})")


def render_processes(args: argparse.Namespace, device: torch.device) -> int:
    """``--render-processes``, or its default: on a GPU the usable cores but one, on the CPU none."""
    if args.render_processes is None:
        return max(1, usable_cores() - 1) if device.type != "cpu" else 0
    if args.render_processes < 0:
        raise SystemExit(f"--render-processes must be >= 0, got {args.render_processes}")
    return args.render_processes


def worker_layout(args: argparse.Namespace) -> tuple[int, int]:
    """(workers, torch threads per worker) for ``--workers``, ``--threads`` and ``--device``:
    render processes draw whole batches for one trainer, so they take one worker."""
    cores = usable_cores()
    device = training_device(args)
    if device.type != "cpu" or render_processes(args, device):
        if args.workers > 1:
            raise SystemExit("--workers is for training on the CPU with each worker drawing its share; "
                             "on a GPU, or with --render-processes, one process trains")
        return 1, args.threads or 1
    workers = args.workers or min(cores, args.batch_size)
    if not 1 <= workers <= args.batch_size:
        raise SystemExit(f"--workers must be between 1 and --batch-size ({args.batch_size}), got {workers}")
    return workers, args.threads or max(1, cores // workers)


def run(args: argparse.Namespace) -> int:
    """Train on ``--workers`` processes: this one is worker 0 (progress, evaluation,
    checkpoint); the others are spawned and meet it through a rendezvous file."""
    workers, threads = worker_layout(args)
    if workers == 1:
        return _train(0, 1, threads, args, None)
    context = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="train-demo-") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        others = [context.Process(target=_train, args=(rank, workers, threads, args, rendezvous), daemon=True)
                  for rank in range(1, workers)]
        for process in others:
            process.start()
        try:
            code = _train(0, workers, threads, args, rendezvous)
        finally:
            for process in others:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
        failed = [process.exitcode for process in others if process.exitcode]
        if failed:
            raise SystemExit(f"train-demo: a worker process failed (exit codes {failed})")
        return code


def _train(rank: int, workers: int, threads: int, args: argparse.Namespace, rendezvous: str | None) -> int:
    """One worker: set up its process group (when there are several) and train."""
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    distributed = workers > 1
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=workers,
                                timeout=datetime.timedelta(minutes=5))
    try:
        return _train_loop(rank, workers, args, distributed)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train_loop(rank: int, workers: int, args: argparse.Namespace, distributed: bool) -> int:
    """Every worker walks the same stream of batches and renders its own slice of each.
    The loss is the mean over the whole batch's caption tokens and the gradients are
    summed over the workers, so the weights stay identical on all of them and match a
    single process's up to the order of float additions."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = training_device(args)
    with tempfile.TemporaryDirectory(prefix="train-demo-") as scratch:  # only worker 0 writes to --out
        vision, decoder, fusion, tokenizer, text_config = build_models(args, out if rank == 0 else Path(scratch))
    for module in (vision, decoder, fusion):  # built (and seeded) on the CPU: the same start on any device
        module.to(device)
    vision_config = vision.config
    params = [*vision.parameters(), *decoder.parameters(), *fusion.parameters()]
    optimizer = make_optimizer(vision, decoder, fusion, args)
    examples = Examples(tokenizer, vision_config.image_size, vision_config.tokens_per_image, args.seed)
    share = range(rank * args.batch_size // workers, (rank + 1) * args.batch_size // workers)

    def loss_sum(tower: torch.nn.Module, lm: torch.nn.Module, pixels: torch.Tensor, input_ids: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        features = tower(pixels)  # [b, L, C]
        return caption_loss(fusion, lm, tokenizer.ids.im_start, features, input_ids, labels, "sum")

    eager_loss = functools.partial(loss_sum, vision, decoder)
    step_loss = eager_loss
    compile_models = device.type == "cpu" if args.compile is None else args.compile
    if compile_models:  # the decoder sees a new padded length every batch: compile it for dynamic shapes
        step_loss = functools.partial(loss_sum, torch.compile(vision), torch.compile(decoder, dynamic=True))

    log: list[dict[str, float]] = []
    started = time.perf_counter()
    progress = tqdm(range(args.steps), desc="train step37-tiny", unit="step", disable=rank != 0)
    with batch_stream(examples, args, share, device) as batches:
        for step in progress:
            pixels, input_ids, labels = next(batches)
            set_learning_rate(optimizer, learning_rate(step, args))
            targets = (labels != IGNORE).sum().to(torch.float32)
            if distributed:
                dist.all_reduce(targets)  # caption tokens in the whole batch
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = step_loss(pixels, input_ids, labels) / targets
                loss.backward()
            except Exception as exc:  # only a failure of the first compiled step falls back; others re-raise
                if step or step_loss is eager_loss:
                    raise
                print(f"train-demo: torch.compile failed ({type(exc).__name__}: {exc}); training without it",
                      flush=True)
                step_loss = eager_loss
                optimizer.zero_grad(set_to_none=True)
                loss = step_loss(pixels, input_ids, labels) / targets
                loss.backward()
            if distributed:
                loss = _sum_gradients(params, loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % 10 == 0 or step == args.steps - 1:  # reading the loss waits for the step (on a GPU)
                value = loss.item()
                progress.set_postfix(loss=f"{value:.4f}")
                log.append({"step": step, "loss": round(value, 5), "lr": learning_rate(step, args),
                            "elapsed_s": round(time.perf_counter() - started, 1)})
            if rank == 0 and step % 100 == 0:  # a run stopped early still leaves its loss curve
                partial = {"finished": False, "workers": workers, "args": vars(args), "log": log}
                (out / "training_log.json").write_text(json.dumps(partial, indent=2) + "\n")
    if rank != 0:
        return 0

    train_seconds = time.perf_counter() - started
    vision.train(False)
    decoder.train(False)
    torch.set_num_threads(usable_cores())  # the other workers are done: evaluate on all cores
    captioner = InProcessCaptioner(vision, decoder, fusion, tokenizer)
    scores = evaluate(captioner, args.eval_scenes, args.eval_seed, vision_config.image_size)
    for module in (vision, decoder, fusion):
        module.cpu()
    report = {"finished": True, "train_seconds": round(train_seconds, 1), "workers": workers,
              "device": str(device), "compiled": step_loss is not eager_loss, "args": vars(args), "eval": scores,
              "log": log}
    save_checkpoint(out, vision=vision, decoder=decoder, fusion=fusion, text_config=text_config,
                    tokenizer=tokenizer, extra_config={"training": {k: report[k] for k in ("train_seconds", "eval")}})
    (out / "training_log.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"train_seconds": report["train_seconds"], "eval": scores}, indent=2))
    return 0


@contextlib.contextmanager
def batch_stream(examples: Examples, args: argparse.Namespace, share: range,
                 device: torch.device) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """This worker's batches on ``device``: rendered between steps (its ``share`` of each),
    or, with render processes, whole batches rendered ahead while the model trains."""
    processes = render_processes(args, device)
    if not processes:
        yield (examples.batch(args.batch_size, share, device) for _ in itertools.count())
        return
    pool = ProcessPoolExecutor(processes, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        yield examples.prefetched(args.batch_size, pool, device)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    """In a render process: exit once the trainer is gone (killed, say), rather than wait
    on its job queue for ever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _sum_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Sums every worker's gradients and loss part in one all-reduce; returns the batch's loss."""
    flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params),
                      loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-1]
