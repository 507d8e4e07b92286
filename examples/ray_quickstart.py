"""Ray Compiled Graph's quickstart (docs.ray.io, ray-core/compiled-graph/quickstart), run
on dagc by adding one line: ``dagc.patch_ray()``.

Everything below that line is written against Ray's API only - ``InputNode``, ``bind``,
``experimental_compile``, ``execute``, ``ray.get``, ``execute_async``, Ray's exceptions -
as the quickstart writes it: hello world, data dependencies and MultiOutputNode, asyncio,
what happens when a method raises, execution timeouts, and tensors between actors. The
steps that need GPUs (NCCL between two GPU actors) run only where two GPUs are present.

    python examples/ray_quickstart.py
"""

import asyncio
import time

import dagc

dagc.patch_ray()  # the one line: experimental_compile() now compiles with dagc

import ray  # noqa: E402  (after the patch, to show it comes first)
import torch  # noqa: E402  (after the patch, to show it comes first)
from ray.dag import InputNode, MultiOutputNode  # noqa: E402  (after the patch, to show it comes first)


@ray.remote
class SimpleActor:
    def echo(self, msg):
        return msg


@ray.remote
class EchoActor:
    def echo(self, msg):
        return msg

    def fail(self, msg):
        raise RuntimeError(f"failed on {msg!r}")

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


@ray.remote
class TensorSender:
    def send(self, shape, dtype, value: int):
        return torch.ones(shape, dtype=dtype) * value


@ray.remote
class TensorReceiver:
    def recv(self, tensor: torch.Tensor):
        return (tensor[0].item(), tensor.shape, tensor.dtype, tensor.device.type)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def hello_world():
    a = SimpleActor.remote()
    for _ in range(5):  # warm up
        ray.get(a.echo.remote("hello"))
    t0 = time.perf_counter()
    ray.get(a.echo.remote("hello"))
    print(f"classic Ray actor call: {us(time.perf_counter() - t0)}")

    with InputNode() as inp:
        dag = a.echo.bind(inp)
    dag = dag.experimental_compile()
    for _ in range(5):
        ray.get(dag.execute("hello"))
    t0 = time.perf_counter()
    msg = ray.get(dag.execute("hello"))
    print(f"compiled graph execution: {us(time.perf_counter() - t0)} -> {msg!r}")
    print(f"compiled with dagc: {isinstance(dag, dagc.CompiledDag)}")
    dag.teardown()


def data_dependencies():
    a, b = SimpleActor.remote(), SimpleActor.remote()
    with InputNode() as inp:
        x = a.echo.bind(inp)  # a chain
        dag = b.echo.bind(x)
    dag = dag.experimental_compile()
    print("chain:", ray.get(dag.execute("hello")))
    dag.teardown()

    with InputNode() as inp:  # several outputs
        dag = MultiOutputNode([a.echo.bind(inp), b.echo.bind(inp)])
    dag = dag.experimental_compile()
    refs = dag.execute("hello")  # one ref per output
    print("MultiOutputNode:", ray.get(refs))
    dag.teardown()


def with_asyncio():
    a = SimpleActor.remote()
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    dag = dag.experimental_compile(enable_asyncio=True)

    async def main():
        futs = [await dag.execute_async(i) for i in range(3)]
        return [await fut for fut in futs]

    print("asyncio:", asyncio.run(main()))
    dag.teardown()


def failures_and_timeouts():
    a, b = EchoActor.remote(), EchoActor.remote()
    with InputNode() as inp:
        dag = MultiOutputNode([a.sleep.bind(inp), b.fail.bind(inp)])
    dag = dag.experimental_compile()
    t0 = time.perf_counter()
    try:
        ray.get(dag.execute(2))
    except RuntimeError as e:  # the method's own exception class
        assert isinstance(e, ray.exceptions.RayTaskError)
        print(
            f"a method raised, seen after {time.perf_counter() - t0:.2f} s "
            f"(the 2 s branch is not waited for): {str(e).splitlines()[0]}"
        )
    dag.teardown()

    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    dag = dag.experimental_compile()
    ref = dag.execute(1)
    try:
        ray.get(ref, timeout=0.1)
    except ray.exceptions.RayChannelTimeoutError:
        print("timed out after 0.1 s; the result is still there:", ray.get(ref, timeout=10))
    dag.teardown()


def tensors():
    sender, receiver = TensorSender.remote(), TensorReceiver.remote()
    with InputNode() as inp:
        dag = sender.send.bind(inp.shape, inp.dtype, inp.value)
        dag = dag.with_tensor_transport()  # "auto": a communicator here
        dag = receiver.recv.bind(dag)
    dag = dag.experimental_compile()
    print("tensor received:", ray.get(dag.execute(shape=(10,), dtype=torch.float16, value=1)))
    dag.teardown()

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        gpu_sender = TensorSender.options(num_gpus=1).remote()
        gpu_receiver = TensorReceiver.options(num_gpus=1).remote()
        with InputNode() as inp:
            dag = gpu_sender.send.bind(inp.shape, inp.dtype, inp.value)
            dag = dag.with_tensor_transport(transport="nccl")
            dag = gpu_receiver.recv.bind(dag)
        dag = dag.experimental_compile()
        print("over NCCL:", ray.get(dag.execute(shape=(10,), dtype=torch.float16, value=1)))
        dag.teardown()


if __name__ == "__main__":
    ray.init(include_dashboard=False)
    hello_world()
    data_dependencies()
    with_asyncio()
    failures_and_timeouts()
    tensors()
    ray.shutdown()
