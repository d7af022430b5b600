"""Structured outputs: a request's response_format, structured_outputs or forced tool call -> a
grammar, compiled by xgrammar off the event loop and the engine thread, within size and time limits.

JSON is compact (no free whitespace: a sampled model cannot pad forever) and schemas are compiled
strictly (properties and items a schema does not name are not generated). Schemas are checked with
the `jsonschema` library first; keywords xgrammar would silently ignore are refused, so an output
that completes is valid against the schema.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jsonschema
import xgrammar as xgr

from loader.config import Config
from server.errors import APIError
from server.schemas import ChatCompletionRequest, SamplingRequest, StructuredOutputs

# keywords whose constraint xgrammar does not enforce: refused rather than silently dropped
UNSUPPORTED_KEYWORDS = frozenset(
    {"not", "if", "then", "else", "allOf", "dependentSchemas", "dependencies"}
    | {"unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$dynamicAnchor"}
)
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames")
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "items")
CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars kept (xgrammar's LRU, keyed by content)
COMPILE_THREADS = 4
ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object


@dataclass(frozen=True)
class GrammarSpec:
    """What to compile: kind (json_schema, regex, ebnf, structural_tag), its text, and the request
    parameter it came from (named by errors)."""

    kind: str
    source: str
    param: str


def _unsupported(schema: Any, path: str = "#") -> str | None:
    """The path of the first keyword in schema that xgrammar would ignore, else None."""
    if not isinstance(schema, dict):
        return None
    ignored = sorted(UNSUPPORTED_KEYWORDS & schema.keys())
    if ignored:
        return f"{path}/{ignored[0]}"
    children: list[tuple[str, Any]] = []
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(f"{key}/{name}", sub) for name, sub in schema[key].items()]
    children += [(key, schema[key]) for key in SCHEMA_VALUES if isinstance(schema.get(key), dict)]
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(f"{key}/{i}", sub) for i, sub in enumerate(schema[key])]
    for where, sub in children:
        found = _unsupported(sub, f"{path}/{where}")
        if found:
            return found
    return None


def check_schema(schema: Any, param: str) -> str:
    """A JSON schema (object or JSON text) validated for compiling, as JSON text; 400 naming
    param otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            message = f"{param} is not valid JSON: {error}"
            raise APIError(message, 400, "invalid_grammar", param) from None
    if not isinstance(schema, dict):
        raise APIError(f"{param} must be a JSON schema object", 400, "invalid_grammar", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise APIError(
            f"{param} is not a valid JSON schema: {error.message}", 400, "invalid_grammar", param
        ) from None
    keyword = _unsupported(schema)
    if keyword:
        raise APIError(
            f"{param} uses a keyword structured outputs cannot enforce: {keyword}",
            400,
            "unsupported_schema",
            param,
        )
    return json.dumps(schema, ensure_ascii=False)


def _ebnf_string(text: str) -> str:
    """text as a double-quoted EBNF literal."""
    return json.dumps(text, ensure_ascii=False)


def structured_outputs_spec(spec: StructuredOutputs) -> GrammarSpec:
    """The grammar of vLLM's structured_outputs field."""
    param = "structured_outputs"
    if spec.json_ is not None:
        return GrammarSpec("json_schema", check_schema(spec.json_, param), param)
    if spec.json_object:
        return GrammarSpec("json_schema", ANY_OBJECT, param)
    if spec.regex is not None:
        return GrammarSpec("regex", spec.regex, param)
    if spec.choice is not None:
        options = " | ".join(_ebnf_string(choice) for choice in spec.choice)
        return GrammarSpec("ebnf", f"root ::= {options}", param)
    return GrammarSpec("ebnf", spec.grammar or "", param)


def output_spec(req: SamplingRequest) -> GrammarSpec | None:
    """The constraint a completion or chat request puts on its output (tools aside)."""
    if req.structured_outputs is not None:
        if isinstance(req, ChatCompletionRequest) and req.response_format is not None:
            if req.response_format.type != "text":
                raise APIError(
                    "give either response_format or structured_outputs, not both",
                    400,
                    "invalid_value",
                    "structured_outputs",
                )
        return structured_outputs_spec(req.structured_outputs)
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_schema", ANY_OBJECT, "response_format")
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    source = check_schema(schema if schema is not None else {}, "response_format")
    return GrammarSpec("json_schema", source, "response_format")


def _message(error: Exception) -> str:
    """xgrammar's error text without its C++ source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)


class Grammars:
    """Compiles GrammarSpecs for the served tokenizer; compiled grammars are cached by content."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int], config: Config) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.max_bytes = config.max_grammar_bytes
        self.timeout_s = config.grammar_compile_timeout_s
        self.pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="loraplex-grammar")
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """xgrammar's compiler over the base tokenizer (built on first use, on a pool thread)."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=1, cache_limit_bytes=CACHE_BYTES
                )
            return self._compiler

    def compile_now(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """Compile on the calling thread (cached by content); raises on a bad spec."""
        compiler = self.compiler
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.source, any_whitespace=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(spec.source)
        return compiler.compile_grammar(spec.source)

    async def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar, awaited off the event loop; 400 naming spec.param if it is too
        large, invalid or too slow to compile (a slow compile finishes in the background)."""
        size = len(spec.source.encode())
        if size > self.max_bytes:
            raise APIError(
                f"{spec.param} is {size} bytes; the limit is {self.max_bytes} (--max-grammar-bytes)",
                400,
                "grammar_too_large",
                spec.param,
            )
        work = asyncio.get_running_loop().run_in_executor(self.pool, self.compile_now, spec)
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                f"{spec.param} did not compile within {self.timeout_s:g} s "
                "(--grammar-compile-timeout-s); simplify it",
                400,
                "grammar_too_complex",
                spec.param,
            ) from None
        except (RuntimeError, ValueError, TypeError) as error:
            raise APIError(
                f"{spec.param} cannot be compiled: {_message(error)}",
                400,
                "invalid_grammar",
                spec.param,
            ) from None

    def close(self) -> None:
        """Stop the compile threads (a compile in progress finishes)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
