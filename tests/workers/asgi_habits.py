"""The FastAPI app of the ASGI launchers' tests (workers/python/tests/
integration/fastapi_app.py) with the habits of app_habits.py."""

import app_habits  # noqa: F401
from integration.fastapi_app import app  # noqa: F401
