"""Spend under control: shared provider limits, budgets and prices.

`limits` (the limits.yaml file), `window` (a limit's sliding window, pure), `mirror` (a KV
key kept current by a watch, written compare-and-set), `limiter` (limits and provider
pauses shared by every process), `budgets` (run and agent budget accounts), `prices` (the
price table). The model wrapper that uses them is `chorus.llm.limited`; this package sits
beside `chorus.client`, below the models, the engine and the roles that use it.
"""
