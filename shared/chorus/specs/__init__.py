"""What users write: agent and workflow specs, the expression language, templates, YAML loading.

The bottom of the library beside `errors` and `subjects`: nothing here imports the wire
(`chorus.messages`), NATS, or any role, so the wire may import these definitions.
"""
