#!/usr/bin/env python3
"""A real MCP client (the official Python SDK, `mcp` on PyPI) driving `sparkctl mcp` over stdio.

    client.py SERVER [ARG...] < session.json > transcript.json

session.json: {"client_name": "...", "cwd": "...", "env": {...},
               "calls": [{"tool": "apply_patch", "arguments": {...}}, ...]}

It starts the server as an MCP host does (a child process, the protocol on its stdin/stdout),
initializes with `client_name` as clientInfo.name, lists the tools, makes each call in order in
one session, and prints one JSON object: the server's name and instructions, the tools (name,
description, input schema, annotations) and every call's result (is_error and its text), for the Rust test to
assert on.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client


async def main() -> None:
    session_spec = json.load(sys.stdin)
    server = StdioServerParameters(
        command=sys.argv[1],
        args=sys.argv[2:],
        env=session_spec.get("env"),
        cwd=session_spec.get("cwd"),
    )
    client_info = types.Implementation(name=session_spec["client_name"], version="1.0.0")
    out = {"tools": [], "results": []}
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write, client_info=client_info) as session:
            init = await session.initialize()
            out["server"] = {"name": init.server_info.name, "version": init.server_info.version}
            out["instructions"] = init.instructions
            listed = await session.list_tools()
            out["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema,
                 "annotations": t.annotations.model_dump(by_alias=True, exclude_none=True) if t.annotations else None}
                for t in listed.tools
            ]
            for call in session_spec["calls"]:
                result = await session.call_tool(call["tool"], call.get("arguments", {}))
                text = "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))
                out["results"].append({"tool": call["tool"], "is_error": bool(result.is_error), "text": text})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
