"""Read a run's TensorBoard event files for real (TFRecord framing: length, crc, data, crc)."""

import os
import struct


def read_scalars(run_dir) -> dict[str, list[float]]:
    """{tag: [values in file order]} of every scalar in the run folder's event files."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(run_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars
