"""QGIS entry point: menu and toolbar action, dock widget, Processing provider, dependency check."""

from pathlib import Path
from typing import List, Optional

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QPushButton

from .core import get_logger
from .gis import dependencies
from .gis.logging_bridge import install_message_log_handler, remove_message_log_handler

LOGGER = get_logger("plugin")
PLUGIN_TITLE = "Lookalike"
MENU_TITLE = "&Lookalike"


class LookalikePlugin:
    """Owns every object the plugin adds to QGIS, so that ``unload`` can remove all of them."""

    def __init__(self, iface):
        self.iface = iface
        self.plugin_folder = Path(__file__).resolve().parent
        self.actions: List[QAction] = []
        self.toolbar = None
        self.dock = None
        self.provider = None
        self.log_handler = None
        self.install_task = None
        self.dependency_message = None

    # Called by QGIS before initGui for plugins with hasProcessingProvider=yes, and again by
    # initGui for QGIS versions that do not.
    def initProcessing(self) -> None:  # noqa: N802 - QGIS plugin interface
        # Packages the Install button put into the profile in an earlier session.
        dependencies.add_packages_folder_to_path()
        if self.log_handler is None:
            # qgis_process calls only this method. Without a handler, Python's logging would print
            # each warning to stderr, after Processing has already shown it.
            self.log_handler = install_message_log_handler()
        if self.provider is not None:
            return
        # "from .package import module" lets QGIS's import hook record the subpackage too, so
        # unloading the plugin removes every one of its modules.
        from .processing import provider as provider_module

        self.provider = provider_module.LookalikeProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS plugin interface
        if self.actions:
            return
        self.initProcessing()

        icon = QIcon(str(self.plugin_folder / "icon.svg"))
        dock_action = QAction(icon, "Lookalike similarity search", self.iface.mainWindow())
        dock_action.setObjectName("lookalikeShowDock")
        dock_action.setCheckable(True)
        dock_action.setToolTip("Show the Lookalike panel: build an index and find look-alike places")
        dock_action.toggled.connect(self.set_dock_visible)
        self.actions.append(dock_action)

        self.toolbar = self.iface.addToolBar(PLUGIN_TITLE)
        self.toolbar.setObjectName("LookalikeToolbar")
        self.toolbar.addAction(dock_action)
        self.iface.addPluginToRasterMenu(MENU_TITLE, dock_action)

        self.check_dependencies()
        LOGGER.info("Lookalike loaded from %s", self.plugin_folder)

    def unload(self) -> None:
        if self.install_task is not None:
            self.install_task.on_finished = None
        if self.dependency_message is not None:
            # Its Install button would start pip for a plugin that is gone, once per reload.
            self.iface.messageBar().popWidget(self.dependency_message)
            self.dependency_message = None
        if self.dock is not None:
            self.dock.close()
            self.iface.removeDockWidget(self.dock)
            if hasattr(self.dock, "cleanup"):
                self.dock.cleanup()
            self.dock.deleteLater()
            self.dock = None
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU_TITLE, action)
            action.toggled.disconnect(self.set_dock_visible)
            action.deleteLater()
        self.actions = []
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.log_handler is not None:
            remove_message_log_handler(self.log_handler)
            self.log_handler = None

    def set_dock_visible(self, visible: bool) -> None:
        if visible and self.dock is None:
            from .ui import dock as dock_module

            self.dock = dock_module.LookalikeDockWidget(self.iface, self.iface.mainWindow())
            # Opened and closed, not visible: a dock covered by another panel's tab is hidden but
            # stays open, and unchecking the action would close it from under that tab.
            self.dock.openedStateChanged.connect(self.actions[0].setChecked)
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        if self.dock is None:
            return
        if visible:
            # Raises the dock's tab when it shares its place with other panels.
            self.dock.setUserVisible(True)
        else:
            self.dock.hide()

    def check_dependencies(self) -> List[str]:
        """Tell the user which runtime packages are missing and offer to install them."""
        missing = dependencies.missing_packages()
        if not missing:
            return missing
        LOGGER.warning("Missing Python packages: %s", ", ".join(missing))
        bar = self.iface.messageBar()
        message = bar.createMessage(
            PLUGIN_TITLE,
            f"Indexing and search need the Python packages {', '.join(missing)}, "
            "which QGIS's Python does not have. Click Install to add them to your profile.",
        )
        install_button = QPushButton("Install")
        install_button.setObjectName("lookalikeInstallDependencies")
        install_button.clicked.connect(lambda: self.install_dependencies(missing))
        message.layout().addWidget(install_button)
        self.dependency_message = bar.pushWidget(message, Qgis.MessageLevel.Warning)
        return missing

    def install_dependencies(self, import_names: List[str], python: Optional[str] = None) -> None:
        """Start pip in a background task; the outcome reaches the message bar when it ends."""
        if self.install_task is not None:
            return
        if self.dependency_message is not None:
            self.iface.messageBar().popWidget(self.dependency_message)
            self.dependency_message = None
        self.install_task = dependencies.InstallDependenciesTask(
            import_names, on_finished=self.on_install_finished, python=python
        )
        QgsApplication.taskManager().addTask(self.install_task)
        self.iface.messageBar().pushMessage(
            PLUGIN_TITLE, "Installing Python packages in the background…", Qgis.MessageLevel.Info, 5
        )

    def on_install_finished(self, succeeded: bool, task) -> None:
        self.install_task = None
        bar = self.iface.messageBar()
        still_missing = dependencies.missing_packages(task.import_names)
        if succeeded and not still_missing:
            bar.pushMessage(PLUGIN_TITLE, "Python packages installed; Lookalike is ready.",
                            Qgis.MessageLevel.Success, 10)
            return
        reason = task.error_message or f"{', '.join(still_missing)} still cannot be imported"
        bar.pushMessage(
            PLUGIN_TITLE,
            f"Installing Python packages failed: {reason}.",
            Qgis.MessageLevel.Critical,
            0,
        )
