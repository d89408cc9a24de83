"""The HTTP shell: FastAPI app, dependencies and routers over the plain service modules."""
