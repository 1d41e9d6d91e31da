"""A ClientApp that does what each message's config asks, for tests of the worker pool: it
counts its messages in its node state, then sleeps (``sleep`` seconds) or exits (``exit``, the
exit code) if asked, and replies with its process id and the count."""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def act(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    count = 1
    if "count" in context.state.array_records:
        count += int(context.state.array_records["count"].to_torch_state_dict()["n"])
    context.state["count"] = ArrayRecord({"n": torch.tensor(count)})
    if "sleep" in config:
        time.sleep(float(config["sleep"]))
    if "exit" in config:
        os._exit(int(config["exit"]))
    return Message(
        RecordDict({"metrics": MetricRecord({"pid": os.getpid(), "count": count})}), reply_to=msg
    )
