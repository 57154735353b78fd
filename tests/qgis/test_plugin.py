"""Plugin life cycle: load, unload, reload, the missing-package path and the built zip."""

import logging
import stat
import sys
import time
import zipfile

import pytest
import qgis.utils
from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtWidgets import QPushButton

import lookalike
from lookalike import plugin as plugin_module
from lookalike.core import LOGGER_NAME
from lookalike.gis import dependencies
from lookalike.gis.logging_bridge import QgsMessageLogHandler


def _provider_ids():
    return [provider.id() for provider in QgsApplication.processingRegistry().providers()]


def _lookalike_handlers():
    return [h for h in logging.getLogger(LOGGER_NAME).handlers if isinstance(h, QgsMessageLogHandler)]


def _wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        QgsApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture()
def plugin(qgis_iface):
    instance = lookalike.classFactory(qgis_iface)
    yield instance
    instance.unload()


def test_init_gui_adds_action_provider_and_log_handler(plugin, qgis_iface):
    plugin.initGui()

    assert len(plugin.actions) == 1
    assert plugin.toolbar is not None
    assert plugin.actions[0] in plugin.toolbar.actions()
    assert _provider_ids().count("lookalike") == 1
    assert len(_lookalike_handlers()) == 1


def test_init_gui_twice_does_not_duplicate(plugin):
    plugin.initGui()
    plugin.initGui()
    plugin.initProcessing()

    assert len(plugin.actions) == 1
    assert _provider_ids().count("lookalike") == 1
    assert len(_lookalike_handlers()) == 1


def test_unload_removes_everything(plugin):
    plugin.initGui()
    action = plugin.actions[0]
    toolbar = plugin.toolbar

    plugin.unload()

    assert plugin.actions == []
    assert plugin.toolbar is None
    assert "lookalike" not in _provider_ids()
    assert _lookalike_handlers() == []
    # The toggled signal is disconnected, so a late toggle cannot re-create the dock.
    assert action.receivers(action.toggled) == 0
    QgsApplication.processEvents()
    del toolbar


def test_load_unload_load_again(qgis_iface):
    for _ in range(2):
        instance = lookalike.classFactory(qgis_iface)
        instance.initGui()
        assert _provider_ids().count("lookalike") == 1
        instance.unload()
        assert "lookalike" not in _provider_ids()


def test_installed_packages_found_at_start(plugin, monkeypatch, tmp_path):
    # The Install button of an earlier session left a package in the profile's folder.
    folder = tmp_path / "packages"
    (folder / "lookalike_probe_package").mkdir(parents=True)
    (folder / "lookalike_probe_package" / "__init__.py").write_text("FOUND = True\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "packages_folder", lambda: folder)
    monkeypatch.setattr(sys, "path", list(sys.path))

    plugin.initGui()

    assert str(folder) in sys.path
    import lookalike_probe_package

    assert lookalike_probe_package.FOUND
    sys.modules.pop("lookalike_probe_package", None)


def test_missing_package_shows_install_button(plugin, qgis_iface, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_packages", lambda names=None: ["hnswlib"])
    monkeypatch.setattr(plugin_module.dependencies, "missing_packages", lambda names=None: ["hnswlib"])

    plugin.initGui()

    item = qgis_iface.messageBar().currentItem()
    assert item is not None
    assert "hnswlib" in item.text()
    buttons = [b for b in item.findChildren(QPushButton) if b.objectName() == "lookalikeInstallDependencies"]
    assert len(buttons) == 1


def test_unload_removes_install_button(plugin, qgis_iface, monkeypatch):
    monkeypatch.setattr(plugin_module.dependencies, "missing_packages", lambda names=None: ["hnswlib"])
    plugin.initGui()

    plugin.unload()

    item = qgis_iface.messageBar().currentItem()
    assert item is None or not [button for button in item.findChildren(QPushButton)
                                if button.objectName() == "lookalikeInstallDependencies"]


def test_install_task_runs_pip_command_and_reports(plugin, qgis_iface, monkeypatch, tmp_path):
    # A stand-in interpreter records the command it gets, so no package is really installed.
    recorded = tmp_path / "arguments.txt"
    fake_python = tmp_path / "python3"
    fake_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{recorded}"\necho installed\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(dependencies, "packages_folder", lambda: tmp_path / "packages")
    missing = iter([["hnswlib"], []])
    monkeypatch.setattr(plugin_module.dependencies, "missing_packages", lambda names=None: next(missing))

    plugin.initGui()
    plugin.install_dependencies(["hnswlib"], python=str(fake_python))
    _wait_for(lambda: plugin.install_task is None)

    arguments = recorded.read_text().split()
    assert arguments[:2] == ["-m", "pip"]
    assert arguments[arguments.index("--target") + 1] == str(tmp_path / "packages")
    constraint_index = arguments.index("--constraint") + 1
    assert constraint_index < len(arguments)
    assert "hnswlib==0.8.0" in arguments
    successes = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("installed" in message for message in successes)


def test_install_task_failure_reaches_message_bar(plugin, qgis_iface, monkeypatch, tmp_path):
    fake_python = tmp_path / "python3"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: no matching distribution' >&2\nexit 1\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(dependencies, "packages_folder", lambda: tmp_path / "packages")

    plugin.initGui()
    plugin.install_dependencies(["hnswlib"], python=str(fake_python))
    _wait_for(lambda: plugin.install_task is None)

    criticals = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert any("exited with code 1" in message for message in criticals)


def test_built_zip_loads_and_unloads_with_qgis_utils(qgis_iface, repo_root, tmp_path, monkeypatch):
    sys.path.insert(0, str(repo_root / "tools"))
    import package_plugin

    zip_path = package_plugin.build_zip(tmp_path / "lookalike.zip", repo_root)
    plugins_folder = tmp_path / "profile" / "python" / "plugins"
    plugins_folder.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(plugins_folder)

    # The tests registered the checkout as "lookalike"; set it aside so the zip's copy is imported.
    saved_modules = {name: module for name, module in sys.modules.items()
                     if name == "lookalike" or name.startswith("lookalike.")}
    for name in saved_modules:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(plugins_folder))
    monkeypatch.setattr(qgis.utils, "iface", qgis_iface)
    # QGIS finds plugins through plugin_paths; its import hook then records the plugin's modules.
    monkeypatch.setattr(qgis.utils, "plugin_paths", [str(plugins_folder)])
    monkeypatch.setattr(qgis.utils, "available_plugins", [])
    monkeypatch.setattr(qgis.utils, "plugins_metadata_parser", {})
    qgis.utils.updateAvailablePlugins()
    assert "lookalike" in qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata("lookalike", "name") == "Lookalike"
    try:
        assert qgis.utils.loadPlugin("lookalike")
        loaded_from = sys.modules["lookalike"].__file__
        assert loaded_from.startswith(str(plugins_folder))
        assert qgis.utils.startPlugin("lookalike")
        assert "lookalike" in _provider_ids()
        assert qgis.utils.unloadPlugin("lookalike")
        assert "lookalike" not in _provider_ids()
        leftover = [name for name in sys.modules if name == "lookalike" or name.startswith("lookalike.")]
        assert leftover == []
    finally:
        for name in [n for n in sys.modules if n == "lookalike" or n.startswith("lookalike.")]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
