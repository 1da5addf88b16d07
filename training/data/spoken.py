"""Spoken digits and command words, synthesized offline by Debian's espeak-ng over its voices.

Each clip is one word said by one voice: an English accent (``en-us``, ``en-gb``, ...) with one of
espeak-ng's voice variants (``m3``, ``f2``, ``klatt4``, ...), at a speed and pitch drawn per clip. The
split is **by variant**: every clip of a test variant, in every accent, is held out, so the test set
holds voices the model never trained on. Clips are resampled from espeak-ng's 22,050 Hz to 16 kHz
with SciPy's polyphase filter and written as 16-bit WAV files; records are
``{"audio": "<file relative to the JSONL>", "label": "<word>", "voice": "<accent>+<variant>"}``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
WORDS = DIGITS + COMMANDS
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "adam", "benjamin", "caleb", "david", "ed", "john", "linda", "paul", "robert", "steph", "travis",
            "klatt", "klatt2", "klatt3", "klatt4", "croak", "shelby")
"""Human-sounding variants (the robot, whisper and novelty ones are left out)."""
TEST_VARIANTS = ("m3", "f2", "david", "klatt2", "steph", "travis")
DEV_VARIANTS = ("m6", "f4", "john")
SAMPLING_RATE = 16000
ESPEAK_RATE = 22050


def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return path


def synthesize(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One word as float32 samples in [-1, 1] at 16 kHz."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory(prefix="espeak-") as folder:  # --stdout's WAV header has no length
        path = Path(folder) / "word.wav"
        subprocess.run([espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                       check=True, capture_output=True)
        rate, samples = wavfile.read(path)
    if rate != ESPEAK_RATE:
        raise ValueError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    audio = samples.astype(np.float32) / 32768.0
    return resample_poly(audio, SAMPLING_RATE, ESPEAK_RATE).astype(np.float32)  # 320/441, anti-aliased


def write_spoken(out: Path, words: tuple[str, ...] = WORDS, accents: tuple[str, ...] = ACCENTS,
                 variants: tuple[str, ...] = VARIANTS, seed: int = 0) -> dict[str, int]:
    """WAV files under ``out/audio`` and ``out/{train,dev,test}.jsonl`` (split by voice variant)."""
    from scipy.io import wavfile

    audio_dir = Path(out) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    parts: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for accent in accents:
        for variant in variants:
            voice = f"{accent}+{variant}"
            part = "test" if variant in TEST_VARIANTS else "dev" if variant in DEV_VARIANTS else "train"
            for word in words:
                speed, pitch = rng.randint(130, 200), rng.randint(30, 70)
                samples = synthesize(word, voice, speed, pitch)
                name = f"{accent}_{variant}_{word}.wav"
                wavfile.write(audio_dir / name, SAMPLING_RATE, np.round(samples * 32767).astype(np.int16))
                parts[part].append({"audio": f"audio/{name}", "label": word, "voice": voice})
    for name, records in parts.items():
        rng.shuffle(records)
        (Path(out) / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {name: len(records) for name, records in parts.items()}
