"""The baseline for the graph-overhead benchmark: one deployment that parses the same request body and
returns a 64x64 PNG in the same response shape, with no classifier, routing, generator or post stage."""

import time

import numpy as np
from fastapi import FastAPI
from ray import serve

from graph.images import b64_png
from graph.schemas import GenerationRequest

api = FastAPI()
_IMG = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@serve.deployment
@serve.ingress(api)
class BareIngress:
    @api.post("/v1/images/generations")
    async def generate(self, req: GenerationRequest) -> dict:
        return {"created": int(time.time()), "data": [{"b64_json": b64_png(_IMG)}]}


app = BareIngress.bind()
