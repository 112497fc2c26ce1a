"""Long fuzzing of the HL7 v2 path, outside the test run (the tests do a short hypothesis run).

    python bench/fuzz_hl7v2.py [--executions 1000000] [--seconds S] [--seed 1] [--validate 0.01]

One execution is one mutated input: a single message (nine in ten) or a whole seed file
(one in ten: batches, several messages, MLLP framing), framed, parsed and mapped. Mutates
real messages (fixtures/hl7v2, and ../shared/data/hl7v2 when present) with delimiter,
escape, framing and byte-level edits, and checks for every input:

- framing never raises, and an MLLP byte stream fed in random chunks frames the same
  (checked on one input in ten: the chunked decoder is the slow part of an execution);
- parsing raises nothing but HL7ParseError (with a reason code);
- map_message never raises (lenient, and strict on one input in five), a refusal has a
  reason and an ACK code,
  and no refusal message quotes a value of the message's PID segment;
- a sample of the resources produced (`--validate`) is valid FHIR R4 (fhir.resources R4B).

A failing input is written to $TMPDIR/fuzz-hl7v2-failure-<n>.hl7; the exit code is 1.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzzing import Fuzz, options  # noqa: E402  (bench/, the script's folder)

from pipeline.hl7v2 import HL7ParseError, parse_message  # noqa: E402
from pipeline.hl7v2_fhir import map_message  # noqa: E402
from pipeline.hl7v2_framing import MLLPDecoder, RawMessage, frame_bytes  # noqa: E402

TOKENS = [b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\r\n", b"\x0b", b"\x1c", b"\x1c\r", b"MSH|^~\\&|",
          b"\\X", b"\\XZZ\\", b"\\.br\\", b"\\F\\", b"\xff", b"\xef\xbb\xbf", b"\x00", b"BHS|^~\\&", b"BTS|9",
          b"FHS|^~\\&", b"FTS|", b"OBX|1|NM|", b"|2.9|", b"|2.1|", b'""', b"99999999999999999999",
          b"20241301", b"+9999", b"PID|1||", b"ZZZ|", b"MRG|"]


def seeds() -> list[bytes]:
    files = sorted((ROOT / "fixtures" / "hl7v2").rglob("*.hl7"))
    shared = ROOT.parent / "shared" / "data" / "hl7v2"
    if shared.is_dir():
        files += sorted(p for p in shared.rglob("*") if p.is_file())
    return [p.read_bytes() for p in files if p.stat().st_size < 200_000]


def mutate(rnd: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 12)):
        pos = rnd.randint(0, len(buf))
        op = rnd.random()
        if op < 0.35:
            buf[pos:pos] = rnd.choice(TOKENS)
        elif op < 0.55:
            del buf[pos:pos + rnd.randint(1, 8)]
        elif op < 0.75 and buf:
            buf[min(pos, len(buf) - 1)] = rnd.randrange(256)
        elif op < 0.9:
            other = rnd.randint(0, len(buf))
            buf[pos:pos] = buf[other:other + rnd.randint(1, 60)]
        else:
            buf[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 20)))
    return bytes(buf)


def pid_values(data: bytes) -> list[str]:
    try:
        msg = parse_message(data)
    except HL7ParseError:
        return []
    seg = msg.segment("PID")
    if seg is None:
        return []
    # values that have the shape of a version or message type may be quoted (they are checked
    # for that shape before being quoted; a PID value of that shape is no identifying value)
    return [v for f in seg[1:] for v in f.replace("^", "|").replace("~", "|").split("|")
            if len(v) >= 6 and not re.fullmatch(r"\d{1,2}(?:\.\d{1,3}){0,3}", v)]


def check(data: bytes, rnd: random.Random, validate: float, model) -> None:
    units = frame_bytes(data)
    if rnd.random() < 0.1:
        dec, events = MLLPDecoder(), []
        pos = 0
        while pos < len(data):
            step = rnd.randint(1, 64)
            events += dec.feed(data[pos:pos + step])
            pos += step
        events += dec.close()
        whole = MLLPDecoder()
        assert [(k, d) for k, d, _ in events] == [(k, d) for k, d, _ in whole.feed(data) + whole.close()]
    for unit in units:
        if not isinstance(unit, RawMessage):
            assert unit.reason
            continue
        try:
            parse_message(unit.data)
        except HL7ParseError as e:
            assert e.reason
        secrets = pid_values(unit.data)
        for strict in (False, True) if rnd.random() < 0.2 else (False,):
            out = map_message(unit.data, "fuzz", strict=strict)
            assert out.ack_code in ("AA", "AE", "AR")
            if out.rejected is not None:
                assert out.rejected.reason and not out.resources
                leaked = [s for s in secrets if s in out.rejected.message]
                assert not leaked, f"a refusal quotes message values: {leaked}"
            elif validate and rnd.random() < validate:
                for res in out.resources:
                    model(res.resource["resourceType"]).model_validate(res.resource)


def main() -> int:
    ap = options(__doc__)
    ap.add_argument("--validate", type=float, default=0.01, help="share of mapped messages validated with R4B")
    args = ap.parse_args()
    from fhir.resources.R4B import get_fhir_model_class

    rnd = random.Random(args.seed)
    corpus = seeds()
    messages = [u.data for f in corpus for u in frame_bytes(f) if isinstance(u, RawMessage)]
    fuzz = Fuzz("hl7v2", ".hl7", args)
    while fuzz.more():
        data = mutate(rnd, rnd.choice(corpus) if rnd.random() < 0.1 else rnd.choice(messages))
        if rnd.random() < 0.2:  # MLLP framing around it
            data = b"\x0b" + data + (b"\x1c\r" if rnd.random() < 0.8 else b"")
        try:
            check(data, rnd, args.validate, get_fhir_model_class)
        except Exception:  # noqa: BLE001 - every failure is reported and kept
            fuzz.failed(lambda out, data=data: out.write_bytes(data))
    return fuzz.finish(f"{len(corpus)} seed files ({len(messages):,} messages)")


if __name__ == "__main__":
    sys.exit(main())
