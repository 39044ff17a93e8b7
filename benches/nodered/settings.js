// Node-RED settings for the nightlight benchmark (see README.md). Headless: no editor,
// no admin API, no HTTP listener at all. Everything Node-RED writes goes to the userDir
// that run.sh passes with --userDir (a temp dir), never to the repo.
module.exports = {
    flowFile: "flows.json",
    // No credentials in the flow; false stops Node-RED generating and storing a key.
    credentialSecret: false,
    // Both false: red.js starts no HTTP server ("Running in headless mode").
    httpAdminRoot: false,
    httpNodeRoot: false,
    uiHost: "127.0.0.1",
    uiPort: 0,
    diagnostics: { enabled: false, ui: false },
    runtimeState: { enabled: false, ui: false },
    telemetry: { enabled: false, updateNotification: false },
    // info is needed for the readiness line "[info] [mqtt-broker:bench broker] Connected to broker: ...".
    // Nothing is logged per message at info, so it costs nothing during the run.
    logging: {
        console: { level: "info", metrics: false, audit: false }
    },
    functionExternalModules: false,
    functionTimeout: 0,
    exportGlobalContextKeys: false,
    externalModules: { autoInstall: false, palette: { allowInstall: false }, modules: { allowInstall: false } }
};
