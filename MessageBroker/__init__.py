"""One broker API over Apache Kafka, Google Cloud Pub/Sub and an in-process broker.

Start with :class:`MessageBroker.message_broker_factory.MessageBrokerFactory`; the contract is
:class:`MessageBroker.broker_interface.BrokerInterface`; errors are in :mod:`MessageBroker.errors`.
"""
