"""The library: everything sftcurate computes, with no Prefect in it (tasks/ wraps it, flows/ orders it)."""
