"""The chaos run: seeded faults over many worker processes, conversations and keys, then a history checker.

``hatch run chaos [--seed N] [--minutes M] [--store redis|dynamodb|both]`` (``python -m integ_tests.chaos``);
``integ_tests/test_chaos.py`` runs a short fixed seed of it under pytest.

What runs (one store at a time, each on its own fresh server, first without faults, then with them):

- a real ``redis-server``, or a serialised moto DynamoDB server (``_moto.SerialMotoServer``, in a process of its own),
  behind a loopback TCP proxy of ours that delays, drops or refuses the store's connections (``proxy.py``);
- worker processes (``server.py``, forked by a fork server: ``worker.py``, ``cluster.py``), each serving
  ``strands_py.http.AgentApp`` under uvicorn and taking direct ``agent.invoke_async`` calls; every agent is a
  ``strands_py.Agent`` with a real ``BedrockModel`` whose boto3 client is scripted (three model steps and two tool
  calls per turn, ``script.py``), a conversation persisted by strands' ``FileSessionManager`` in one shared
  directory, and ``IdempotencyConfig`` with a short lease and a reconcile function for the tool;
- clients (``clients.py``) that send every turn, at its seeded arrival time, with an idempotency key, and retry the
  same key on any worker until they get an answer; a scheduler (``scheduler.py``) that SIGKILLs workers inside model
  calls and tools, SIGSTOPs them past their lease, and breaks the store's connections; workers that start with wall
  clocks off by seconds or minutes, and send some of their session-lock takeovers late (``server.SlowTakeovers``);
  killed workers replaced. After the faults, every conversation gets one closing
  turn.

Everything that happens is written down as it happens (``history.py``): what clients sent and got, every model call
and tool run (fsync'ed before and after), every fault. After the run, the persisted conversations and the session
lock records are read back, and ``checker.py`` (a pure function) reports violations of what the library promises,
and the work paid per acknowledged turn against the fault-free run of the same workload (``report.py`` prints it).
A seed reproduces the workload and the fault schedule (``workload.py``); the interleavings are the machine's.

The integration tests' helper modules (``_moto``, ``_servers``) are top-level modules of ``integ_tests/``, as pytest
imports them; the orchestrator's modules import them the same way (``backends.py`` puts that directory on
``sys.path``). Worker processes import nothing from them.
"""
