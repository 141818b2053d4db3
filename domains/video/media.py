"""Clips on disk: a GIF grid (and MP4 when imageio-ffmpeg is installed), the raw frames, the rewards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GRID_COLUMNS = 8
GRID_MAX = 32  # clips shown in the grid
UPSCALE = 4  # 32 px frames are tiny: each pixel becomes UPSCALE x UPSCALE
FPS = 8


def grid(clips: list[np.ndarray], columns: int = GRID_COLUMNS, upscale: int = UPSCALE) -> np.ndarray:
    """[T, rows * H, columns * W, 3] uint8: clips tiled (1 px grey gutter), pixels enlarged."""
    clips = [c for c in clips if isinstance(c, np.ndarray) and c.ndim == 4]
    frames = max(c.shape[0] for c in clips)
    h, w = clips[0].shape[1:3]
    rows = -(-len(clips) // columns)
    cols = min(columns, len(clips))
    out = np.full((frames, rows * (h + 1), cols * (w + 1), 3), 64, dtype=np.uint8)
    for k, clip in enumerate(clips):
        r, c = divmod(k, columns)
        padded = np.concatenate([clip, np.repeat(clip[-1:], frames - clip.shape[0], axis=0)]) if clip.shape[0] < frames else clip
        out[:, r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = padded[:, :h, :w]
    return np.kron(out, np.ones((1, upscale, upscale, 1), dtype=np.uint8))


def mp4_available() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401 - ships its own ffmpeg binary
    except ImportError:
        return False
    return True


def save_clips(clips: list, rewards, directory: Path) -> list[Path]:
    """samples.gif (grid of the first GRID_MAX clips), samples.mp4 (same, when imageio-ffmpeg is
    installed), clips.npy (every clip, uint8 [N, T, H, W, 3]) and rewards.json."""
    import imageio.v2 as imageio

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    shown = [c for c in clips if isinstance(c, np.ndarray) and c.ndim == 4 and c.dtype == np.uint8]
    if shown:
        tiles = grid(shown[:GRID_MAX])
        imageio.mimsave(directory / "samples.gif", list(tiles), duration=1000 / FPS, loop=0)
        files.append(directory / "samples.gif")
        if mp4_available():
            even = tiles[:, : tiles.shape[1] // 16 * 16, : tiles.shape[2] // 16 * 16]  # H.264 wants sizes in 16s
            imageio.mimsave(directory / "samples.mp4", list(even), fps=FPS, macro_block_size=16)
            files.append(directory / "samples.mp4")
        if len({c.shape for c in shown}) == 1:
            np.save(directory / "clips.npy", np.stack(shown))
            files.append(directory / "clips.npy")
    if rewards is not None:
        (directory / "rewards.json").write_text(json.dumps([float(r) for r in rewards]))
        files.append(directory / "rewards.json")
    return files
