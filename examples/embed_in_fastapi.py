"""The whole hub inside your own FastAPI app: its model ports, and its controller mounted at /.

python examples/embed_in_fastapi.py hub.yaml 8080
"""

import contextlib
import sys

import uvicorn
from fastapi import FastAPI

from mlx_hub import Hub

hub = Hub.from_config(sys.argv[1] if len(sys.argv) > 1 else "hub.yaml")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    async with hub:  # opens the model ports and loads the defaults; frees everything on exit
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/hello")
async def hello() -> dict:
    status = hub.status_document()
    return {"loaded": [m.id for m in status.models if m.metadata.memory_state == "loaded"]}


app.mount("/", hub.asgi)  # the dashboard, /hub/*, /v1 for every model and /metrics, under your app

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
