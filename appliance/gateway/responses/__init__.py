"""The OpenAI Responses API (`POST /v1/responses`) as a translation layer over the chat-completions path.

`protocol` turns a Responses request into a chat request (pure), `output` turns the chat answer, whole or streamed,
into a response object and its events (pure), `store` keeps responses where the privacy policy allows storing
conversations, `service` orchestrates, `routes` is the thin HTTP layer. Because every request goes through
`CompletionService.run`, auth, quotas, privacy screening, the response cache, routing and metrics apply unchanged."""
