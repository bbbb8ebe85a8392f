"""Start-up code: the processes this project runs, and the wiring between the layers.

    api_server  `acestep-api` / `make run`: the API plus supervised worker processes
    worker      `acestep-worker`: one worker against the configured backend
    lambda_api  the Lambda handler (the API through Mangum)
    models      `acestep-models`: list, download or build checkpoints
    bootstrap   settings -> backend -> app / worker / engine

Nothing outside this package imports from it: the layers below receive what they need.
"""
