"""Service definitions: decorators build plain data, and bad signatures fail at definition time."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import taskserve
from taskserve.cli import cli
from taskserve.exceptions import ValidationFailed
from taskserve.queue.sqlite import MIGRATIONS
from taskserve.service import Endpoint, Service, load_service


def test_exported_names_are_sorted_and_exist() -> None:
    assert taskserve.__all__ == sorted(taskserve.__all__)
    for name in taskserve.__all__:
        assert hasattr(taskserve, name), name


def test_status_values_are_the_contract_words() -> None:
    assert [s.value for s in taskserve.TaskStatus] == ["pending", "in_progress", "success", "failure", "cancelled"]
    assert {s.value for s in taskserve.TERMINAL_STATUSES} == {"success", "failure", "cancelled"}


def test_decorators_collect_tasks_and_apis_with_their_options() -> None:
    spec = load_service("tests.services:TestService")
    by_name = {ep.name: ep for ep in spec.endpoints}
    assert spec.name == "testsvc"
    assert by_name["echo"].is_task and by_name["echo"].route == "/echo"
    assert not by_name["describe"].is_task and by_name["describe"].max_attempts == 1
    assert by_name["too_slow"].timeout == 0.5 and by_name["slow_async"].is_async


def test_a_service_can_be_built_without_decorators() -> None:
    class Plain:
        def double(self, x: int) -> int:
            return 2 * x

    spec = Service(Plain, [Endpoint(Plain.double, route="/twice", timeout=5)])
    assert spec.by_route["/twice"].codec.validate({"x": 3}) == b'{"x":3}'
    # The published schema is the contract: "3" is not an integer there, so it is not one here.
    with pytest.raises(ValidationFailed, match="x: expected an integer, got str"):
        spec.by_route["/twice"].codec.validate({"x": "3"})


def test_a_decorated_method_stays_an_ordinary_method() -> None:
    @taskserve.service
    class Svc:
        @taskserve.task(route="gen", max_attempts=2)
        def gen(self, prompt: str) -> str:
            return prompt.upper()

    assert Svc().gen("hi") == "HI"
    assert Svc.__taskserve_service__.by_route["/gen"].max_attempts == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(self, *args: int) -> int: ...", "args"),
        ("class Opaque: ...\ndef f(self, x: Opaque) -> int: ...", "cannot serve"),
    ],
)
def test_unservable_signatures_fail_when_the_service_is_defined(source: str, message: str) -> None:
    namespace: dict[str, object] = {}
    exec(source, namespace)  # a test-local function definition, not input from anywhere
    with pytest.raises(taskserve.ServiceDefinitionError, match=message):
        Service(type("S", (), {}), [Endpoint(namespace["f"])])  # type: ignore[arg-type]


def test_two_endpoints_on_one_route_are_refused() -> None:
    def a(self: object) -> int: ...
    def b(self: object) -> int: ...

    with pytest.raises(taskserve.ServiceDefinitionError, match="both use route"):
        Service(object, [Endpoint(a, route="/x"), Endpoint(b, route="/x")])


def test_migrations_are_numbered_in_increasing_order() -> None:
    numbers = [n for n, _ in MIGRATIONS]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "nomodule"], "MODULE:Class"),
        (["serve", "tests.services:Missing"], "no attribute"),
        (["serve", "tests.services:TestService", "--broker", "postgres://x"], "Unsupported broker"),
    ],
)
def test_cli_explains_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in (result.output + str(result.exception))


def test_cli_help_names_the_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output and "worker" in result.output
